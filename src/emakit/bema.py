"""BEMA: the bias-corrected EMA of Block & Zhang (2025, "EMA Without the Lag: Bias-Corrected
Iterate Averaging Schemes", arXiv 2508.00180)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import BEMAConfig, takes_config
from .ema import EMA
from .store import Store

__all__ = ["BEMA"]


class BEMA(EMA):
    r"""Bias-corrected EMA: an EMA whose lag behind the weights is corrected.

    With ``t`` the batches since the start (t = 0 at the start, where ``theta_0`` and the EMA
    take the model's weights), the update at ``t`` computes

    .. math::
        \beta_t = \max((\ell + m\,t)^{-p_e}, \beta_{min}), \quad
        \mathrm{EMA}_t = (1 - \beta_t)\,\mathrm{EMA}_{t-1} + \beta_t\,\theta_t, \quad
        \alpha_t = (\ell + m\,t)^{-p_b}

    with ``lag`` :math:`\ell`, ``multiplier`` :math:`m`, ``ema_power`` :math:`p_e`,
    ``bias_power`` :math:`p_b`, ``min_ema_multiplier`` :math:`\beta_{min}`, and hands out
    (export, swap, ``module``, ``copy_to``) the weights
    :math:`\mathrm{EMA}_t + \alpha_t (\theta_t - \theta_0)`, :math:`\theta_t` being the
    model's weights at that update, for trainable parameters; averaged buffers (BatchNorm
    statistics) are handed out as their plain EMA (an extrapolated variance can turn
    negative). Early in training (and in fine-tuning) this removes most
    of an EMA's lag while keeping its variance reduction. Names and defaults as TRL's
    ``BEMACallback``, but for its update every 400 steps: here updates follow
    ``update_interval`` (default every batch).

    It keeps three copies of the averaged tensors: the EMA, ``theta_0`` and the weights
    handed out; ``reset()`` makes the current weights the new ``theta_0`` and ``t = 0``.
    Not available with ``shard=True`` or FSDP2 models.

    Args:
        model: the model being trained.
        config: a :class:`~emakit.BEMAConfig`, or its fields as keyword arguments:
            ``ema_power``, ``bias_power``, ``lag``, ``multiplier``, ``min_ema_multiplier``
            (the schedule above) and :class:`~emakit.EMA`'s (``start``, ``update_interval``,
            storage arguments); ``half_life``, ``smoothing`` and ``warmup`` are replaced by
            the schedule and refused. The trainer callbacks take ``config=BEMAConfig(...)``
            and drive a BEMA.

    Example:
        >>> import torch, emakit
        >>> model = torch.nn.Linear(3, 1)
        >>> bema = emakit.BEMA(model)
        >>> for _ in range(5):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(0.1)
        ...     bema.step()
        >>> bema.num_updates
        5
    """

    @takes_config(BEMAConfig)
    def __init__(self, model: nn.Module, config: BEMAConfig | None = None, **kwargs: Any) -> None:
        config = BEMAConfig.resolve(config, kwargs, "BEMA")
        self.ema_power, self.bias_power = config.ema_power, config.bias_power
        self.lag, self.multiplier = config.lag, config.multiplier
        self.min_ema_multiplier = config.min_ema_multiplier
        super().__init__(model, config)
        if config.shard or self.shadow.model_forward:
            raise ValueError("BEMA: not available with shard=True or FSDP2 models")
        # theta_0 and the weights handed out: plain copies, no compensation needed
        store = dict(dtype=config.dtype, device=config.device, buffers=config.buffers,
                     exclude=config.exclude, include=config.include)
        self._origin_store = Store(self.model, **store)
        self._out_store = Store(self.model, **store)
        self._cache: tuple | None = None  # (the three stores' plans, the correction's lists)

    def _t(self, k: int) -> float:
        """Batches (the interval's units) since the start for training time k."""
        return float(k - 1)

    def _base(self, k: int) -> float:
        return self.lag + self.multiplier * self._t(k)

    def _factor(self, first: int, last: int) -> float:
        beta = max(self._base(last) ** -self.ema_power, self.min_ema_multiplier)
        return 1.0 - min(beta, 1.0)

    def _begin(self) -> None:
        super()._begin()
        if self.started:
            self._restart()

    def reset(self) -> None:
        if not self.started:
            self._begin()
            return
        super().reset()
        self._restart()

    def _restart(self) -> None:
        self._origin_store.reset()
        self._out_store.reset()

    def _apply(self, weight: float | Tensor, k: int) -> None:
        super()._apply(weight, k)
        alpha = self._base(k) ** -self.bias_power
        with torch.no_grad():
            self._out_store.update(1.0)  # theta_t: a weight of 1 copies, through the plan
            out, origin, ema, rest_out, rest_ema = self._lists()
            torch._foreach_sub_(out, origin)
            torch._foreach_mul_(out, alpha)
            torch._foreach_add_(out, ema)
            if rest_out:
                torch._foreach_copy_(rest_out, rest_ema)

    def _lists(self) -> tuple[list[Tensor], ...]:
        """The tensor lists the correction runs on, built again only when a store re-planned
        (the views stay valid as long as the three plans do). The correction extrapolates
        along the trajectory: parameters only; buffers (BatchNorm statistics) are handed out
        as their plain average, since an extrapolated running variance can turn negative."""
        plans = (self._out_store.plan, self._origin_store.plan, self.shadow.plan)
        cached = self._cache
        if cached is None or any(a is not b for a, b in zip(plans, cached[0], strict=True)):
            params = {n for n, p in self.model.named_parameters() if p.requires_grad}
            out, origin, ema = (s.tensors() for s in (self._out_store, self._origin_store,
                                                      self.shadow))
            names = [n for n in out if n in params]
            rest = [n for n in out if n not in params]
            lists = ([out[n] for n in names], [origin[n] for n in names],
                     [ema[n] for n in names], [out[n] for n in rest], [ema[n] for n in rest])
            plans = (self._out_store.plan, self._origin_store.plan, self.shadow.plan)
            self._cache = cached = (plans, lists)
        return cached[1]

    @property
    def _handout(self):  # the store whose weights export, swap and module hand out
        return self._out_store

    def state_dict(self) -> dict[str, Any]:
        """:meth:`EMA.state_dict` plus ``origin_weights`` (theta_0) and ``bema_weights``
        (the weights handed out)."""
        state = super().state_dict()
        state["origin_weights"] = {n: t.clone() for n, t in self._origin_store.tensors().items()}
        state["bema_weights"] = {n: t.clone() for n, t in self._out_store.tensors().items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("origin_weights", "bema_weights"):
            if key not in state:
                raise ValueError(f"state: not a BEMA.state_dict(); missing key {key!r}")
        self._origin_store.check_load(state["origin_weights"], "BEMA state['origin_weights']")
        self._out_store.check_load(state["bema_weights"], "BEMA state['bema_weights']")
        super().load_state_dict(state)
        self._origin_store.load(state["origin_weights"], "BEMA state['origin_weights']")
        self._out_store.load(state["bema_weights"], "BEMA state['bema_weights']")

    def __repr__(self) -> str:
        return (f"BEMA(ema_power={self.ema_power}, bias_power={self.bias_power}, lag={self.lag}, "
                f"multiplier={self.multiplier}, start={self.start}, "
                f"update_interval={self.update_interval}, num_updates={self.num_updates})")
