"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2): track power-function EMAs while training, store snapshots of them,
and after training synthesize an EMA of any length from the snapshots.

``profiles`` holds the math and its conventions, ``snapshots`` the file format,
``synthesis`` the solve and the weighted sum, ``tracker`` the :class:`PostHocEMA`.
"""

from .snapshots import SnapshotInfo, list_snapshots
from .synthesis import (
    SynthesisPlan,
    format_intervals,
    plan_synthesis,
    supported_sigma_rels,
    synthesize,
)
from .tracker import PostHocEMA

__all__ = [
    "PostHocEMA",
    "synthesize",
    "plan_synthesis",
    "SynthesisPlan",
    "supported_sigma_rels",
    "format_intervals",
    "list_snapshots",
    "SnapshotInfo",
]
