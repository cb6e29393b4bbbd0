"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2): track power-function EMAs while training, store snapshots of them,
and after training synthesize an EMA of any length from the snapshots.

``profiles`` holds the math and its conventions, ``snapshots`` the file format,
``synthesis`` the solve and the weighted sum, ``tracker`` the :class:`PostHocEMA`.
"""

from .profiles import check_sigma_rel, profile_dot, solve_coefficients
from .snapshots import SnapshotInfo, list_snapshots, read_snapshot_info, scan
from .synthesis import (
    DEFAULT_MAX_ERROR,
    SynthesisPlan,
    format_intervals,
    plan_synthesis,
    supported_sigma_rels,
    synthesize,
)
from .tracker import PostHocEMA

__all__ = [
    "PostHocEMA",
    "SnapshotInfo",
    "synthesize",
    "solve_coefficients",
    "profile_dot",
    "list_snapshots",
    "supported_sigma_rels",
    "format_intervals",
    "DEFAULT_MAX_ERROR",
    "plan_synthesis",
    "SynthesisPlan",
    "read_snapshot_info",
    "scan",
    "check_sigma_rel",
]
