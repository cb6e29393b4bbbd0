r"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2): track power-function EMAs while training, store snapshots of them,
and after training synthesize an EMA of any length from the snapshots.

Conventions (the same as EDM2's ``training/phema.py``):

- Time ``t`` counts updates' clock units from the start of training: batches when
  ``update_interval`` is in ``ba``, epochs when it is in ``ep``. The k-th update happens at
  ``t_k`` (``t_0 = 0``) and the weights it reads, ``theta_k``, stand for the whole interval
  ``(t_{k-1}, t_k]``.
- A power-function EMA of exponent ``gamma`` has the continuous profile
  ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``(0, t]``; its relative width is
  ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``.
- Each update uses ``beta = (1 - dt / t) ** (gamma + 1)`` with ``dt = t_k - t_{k-1}``, so
  ``update_interval > 1`` stays exact. By induction the average after the update at ``t`` is

  .. math:: \bar\theta_t = \sum_k w_k \theta_k, \quad
            w_k = \frac{t_k^{\gamma+1} - t_{k-1}^{\gamma+1}}{t^{\gamma+1}}
                = \int_{t_{k-1}}^{t_k} p_t(\tau)\, d\tau,

  the continuous profile applied exactly to the piecewise-constant weight trajectory. The
  first update (``t_{k-1} = 0``) has ``beta = 0``: the average starts as a copy.
- Synthesis therefore uses the continuous inner product of profiles (EDM2 eq. 151),

  .. math:: \langle p_a, p_b \rangle = \frac{(\gamma_a+1)(\gamma_b+1)}{\gamma_a+\gamma_b+1}
            \frac{\min(t_a,t_b)^{\gamma_a+\gamma_b+1}}{t_a^{\gamma_a+1}\, t_b^{\gamma_b+1}},

  and solves, in float64, ``min_c ||sum_i c_i p_i - p_target||^2`` subject to
  ``sum_i c_i = 1`` (so a constant weight sequence is reproduced exactly; EDM2 instead
  rescales an unconstrained solution) over the snapshots taken at or before the target.
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
