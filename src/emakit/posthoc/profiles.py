r"""The math of post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
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

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..schedules import MAX_SIGMA_REL, MIN_SIGMA_REL, check_sigma_rel

__all__ = ["profile_dot", "solve_coefficients", "check_sigma_rel", "MAX_SIGMA_REL",
           "MIN_SIGMA_REL"]


def profile_dot(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """Inner products ``<p_a, p_b> = integral of p_a(tau) p_b(tau) dtau`` of power-function
    profiles ending at ``t_a`` and ``t_b`` (broadcast, float64, computed in log space)."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64)
                                  for x in (t_a, gamma_a, t_b, gamma_b))
    m = torch.minimum(t_a, t_b)
    log = (
        torch.log((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1))
        + (gamma_a + gamma_b + 1) * torch.log(m)
        - (gamma_a + 1) * torch.log(t_a)
        - (gamma_b + 1) * torch.log(t_b)
    )
    return torch.exp(log)


def solve_coefficients(
    ts: Sequence[float] | Tensor,
    gammas: Sequence[float] | Tensor,
    t_target: float,
    gamma_targets: Sequence[float] | Tensor,
) -> tuple[Tensor, Tensor]:
    """Coefficients ``c`` (shape ``[n, m]``, float64) with ``sum_i c[i, j] p_i ~ p_target_j``
    and ``sum_i c[i, j] = 1``, and the relative L2 error ``||sum_i c_i p_i - p_j|| / ||p_j||``
    of each target's profile (shape ``[m]``).

    ``ts[i]``, ``gammas[i]``: end time and exponent of the i-th stored profile; ``t_target``
    the target's end time (same unit); ``gamma_targets`` the targets' exponents. The
    constrained least squares is solved through its KKT system with ``torch.linalg.lstsq``
    (SVD driver, float64), robust to the near-collinear profiles of dense snapshots.
    """
    f64 = torch.float64
    ts = torch.as_tensor(ts, dtype=f64).reshape(-1) / float(t_target)  # scale: t_target = 1
    gammas = torch.as_tensor(gammas, dtype=f64).reshape(-1)
    g_out = torch.as_tensor(gamma_targets, dtype=f64).reshape(-1)
    n, m = ts.numel(), g_out.numel()
    if n == 0:
        raise ValueError("solve_coefficients: no stored profiles")
    one = torch.ones((), dtype=f64)
    gram = profile_dot(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    rhs = profile_dot(ts[:, None], gammas[:, None], one, g_out[None, :])  # [n, m]
    kkt = torch.zeros(n + 1, n + 1, dtype=f64)
    kkt[:n, :n] = gram
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    b = torch.cat([rhs, torch.ones(1, m, dtype=f64)])
    coefs = torch.linalg.lstsq(kkt, b, driver="gelsd").solution[:n]
    target = profile_dot(one, g_out, one, g_out)
    sq = target - 2 * (coefs * rhs).sum(0) + (coefs * (gram @ coefs)).sum(0)
    error = sq.clamp_min(0).sqrt() / target.sqrt()
    return coefs, error
