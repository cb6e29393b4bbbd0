"""BEMA: the bias-corrected EMA of Block & Zhang (2025, "EMA Without the Lag: Bias-Corrected
Iterate Averaging Schemes", arXiv 2508.00180), a face of the
:class:`~emakit.averager.Averager` with the :class:`~emakit.laws.BiasCorrected` law."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .averager import Averager, Store
from .cadence import Span
from .config import BEMAConfig, BEMAOptions, Unpack
from .laws import BiasCorrected

__all__ = ["BEMA"]


class BEMA(Averager):
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
            (the schedule above) and the timing and storage every average shares
            (``start``, ``update_interval``, ``dtype``, ...). The trainer callbacks take
            ``config=BEMAConfig(...)`` and drive a BEMA.

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

    def __init__(
        self, model: nn.Module, config: BEMAConfig | None = None, **kwargs: Unpack[BEMAOptions]
    ) -> None:
        config = BEMAConfig.resolve(config, dict(kwargs), "BEMA")
        config.require_total()
        self.law = BiasCorrected(
            ema_power=config.ema_power, bias_power=config.bias_power, lag=config.lag,
            multiplier=config.multiplier, min_ema_multiplier=config.min_ema_multiplier,
        )
        super().__init__(model, config, [self.law])
        self.config: BEMAConfig = config
        if config.shard or self._stores[0].model_forward:
            raise ValueError("BEMA: not available with shard=True or FSDP2 models")
        # theta_0 and the weights handed out: plain copies, no compensation needed
        storage = config.storage(compensated=False)
        self._theta0 = self._new_store(storage)
        self._out = self._new_store(storage)
        self._cache: tuple | None = None  # (the three stores' plans, the correction's lists)
        self._constructed()

    ema_power = property(lambda self: self.law.ema_power)
    bias_power = property(lambda self: self.law.bias_power)
    lag = property(lambda self: self.law.lag)
    multiplier = property(lambda self: self.law.multiplier)
    min_ema_multiplier = property(lambda self: self.law.min_ema_multiplier)

    def _all_stores(self) -> list[Store]:
        return [*self._stores, self._theta0, self._out]

    def _handout(self) -> Store:
        return self._out

    def _updated(self, covered: Span) -> None:
        """The weights handed out: ``EMA_t + alpha_t (theta_t - theta_0)`` for parameters."""
        alpha = self.law.alpha(covered.last)
        with torch.no_grad():
            self._out.update(1.0)  # theta_t: a weight of 1 copies, through the plan
            out, origin, ema, rest_out, rest_ema = self._lists()
            if out:
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
        stores = (self._out, self._theta0, self._stores[0])
        plans = tuple(s.plan for s in stores)
        cached = self._cache
        if cached is None or any(a is not b for a, b in zip(plans, cached[0], strict=True)):
            lists = self._build_lists(stores)
            self._cache = cached = (tuple(s.plan for s in stores), lists)
        return cached[1]

    def _build_lists(self, stores: tuple[Store, Store, Store]) -> tuple[list[Tensor], ...]:
        params = {n for n, p in self.model.named_parameters() if p.requires_grad}
        out, origin, ema = (self._named(s) for s in stores)
        names = [n for n in out if n in params]
        rest = [n for n in out if n not in params]
        return ([out[n] for n in names], [origin[n] for n in names], [ema[n] for n in names],
                [out[n] for n in rest], [ema[n] for n in rest])

    def state_dict(self) -> dict[str, Any]:
        """:meth:`EMA.state_dict`'s format plus ``origin_weights`` (theta_0) and
        ``bema_weights`` (the weights handed out)."""
        state = super().state_dict()
        state["origin_weights"] = self._named(self._theta0, clone=True)
        state["bema_weights"] = self._named(self._out, clone=True)
        return state

    def _check_extra(self, state: Mapping[str, Any]) -> None:
        for key in ("origin_weights", "bema_weights"):
            if key not in state:
                raise ValueError(f"state: not a BEMA.state_dict(); missing key {key!r}")
        self._theta0.check_load(state["origin_weights"], "BEMA state['origin_weights']")
        self._out.check_load(state["bema_weights"], "BEMA state['bema_weights']")

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self._theta0.load(state["origin_weights"], "BEMA state['origin_weights']")
        self._out.load(state["bema_weights"], "BEMA state['bema_weights']")

    def _config_record(self) -> dict[str, Any]:
        return {**super()._config_record(), "law": self.law.describe()}

    def __repr__(self) -> str:
        return (f"BEMA(ema_power={self.ema_power}, bias_power={self.bias_power}, lag={self.lag}, "
                f"multiplier={self.multiplier}, start={self.config.start}, "
                f"update_interval={self.update_interval}, num_updates={self.num_updates})")

