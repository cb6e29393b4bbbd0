"""Skip guards: whether the model's current values may enter the average.

Each guard sees every update (and the start copy) before it runs, once, and answers with a
mask for the update's weights: ``1.0`` (go ahead), a 0-d float32 device tensor holding 1 or 0
(decided on the device, no host synchronization), or ``None`` to skip it on the host.
The averager counts what each guard skipped (``skipped_updates``). A new guard is one small
class: the averager, the laws and the stores do not change.

- :class:`NonFinite` (``skip_nonfinite=True``): a model holding NaN or Inf is not averaged;
  one host-device synchronization per update (the only one an option may add).
- :class:`ScalerSkipped` (``grad_scaler=``): an optimizer step a ``torch.amp.GradScaler``
  skipped (Inf/NaN gradients) leaves the average unchanged, decided on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Guard", "Context", "Mask", "NonFinite", "ScalerSkipped"]

#: 1.0, or a 0-d float32 tensor holding 1 or 0 on the device
Mask = float | Tensor


@dataclass(frozen=True)
class Context:
    """What a guard may look at: whether this is the start copy, where training stands (for
    messages), and a check of the model's stored tensors (all ranks; one host sync)."""

    start: bool
    where: str
    sources_finite: Callable[[], bool]


@runtime_checkable
class Guard(Protocol):
    """Decides whether an update's sources may enter the average."""

    def admit(self, context: Context) -> Mask | None:
        """A mask for this update's weights, or None to skip this update (or delay the
        start copy) on the host. Called exactly once per update and start copy."""
        ...

    def skipped(self) -> int:
        """Updates this guard skipped (may synchronize with the device to read a count)."""
        ...


class NonFinite:
    """Skips (counts, warns about) an update whose sources hold NaN or Inf, and delays the
    start copy until the model is finite (warning once)."""

    def __init__(self) -> None:
        self._skipped = 0
        self._warned_start = False

    def admit(self, context: Context) -> Mask | None:
        if context.sources_finite():
            return 1.0
        if context.start:
            if not self._warned_start:
                self._warned_start = True
                warnings.warn(
                    f"emakit: the EMA does not start at {context.where}: the model holds NaN "
                    "or Inf; it starts at the first update time at which the model is finite",
                    RuntimeWarning,
                    stacklevel=5,
                )
            return None
        self._skipped += 1
        warnings.warn(
            f"emakit: skipped an EMA update at {context.where}: the model holds NaN or Inf",
            RuntimeWarning,
            stacklevel=5,
        )
        return None

    def skipped(self) -> int:
        return self._skipped


class ScalerSkipped:
    """Tells, on the device, whether the optimizer step a GradScaler just ran was skipped.

    A step with Inf/NaN gradients is skipped and ``scaler.update()`` then multiplies the
    scale by ``backoff_factor < 1``; otherwise the scale stays or grows (``growth_factor >
    1``). So ``scale_now < scale_before`` marks a skipped step, decided on the device with
    no host sync. ``ema.step()`` must come after ``scaler.update()``, as usual.
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        # one sync here, at construction: the scale before the first step
        self._before: Tensor | float = float(scaler.get_scale()) if scaler.is_enabled() else 0.0
        self._skipped: Tensor | None = None

    def _scale(self) -> Tensor | None:
        # torch keeps the scale tensor itself private; this reads it without a host sync
        if not self.scaler.is_enabled():
            return None
        scale: Tensor | None = self.scaler._get_scale_async()
        return scale

    def admit(self, context: Context) -> Mask | None:
        scale = self._scale()
        if scale is None:  # disabled, or the scaler has not scaled anything yet
            return 1.0
        if context.start:  # the copy ignores the step; the next update compares to now
            self._before = scale.detach().clone()
            return 1.0
        before = self._before
        if not isinstance(before, Tensor):
            before = torch.full_like(scale, before)
        ran = (scale >= before).to(torch.float32)
        self._before = scale.detach().clone()
        self._skipped = (1.0 - ran) if self._skipped is None else self._skipped + (1.0 - ran)
        return ran

    def skipped(self) -> int:
        return 0 if self._skipped is None else int(self._skipped.item())

    def scale_before(self) -> float | None:
        """The scale the next update compares against (the scale at the last update or start
        copy; None when the scaler is disabled), for a saved state: a run resumed between a
        skipped step and the next update must still see the drop. One host sync."""
        if not self.scaler.is_enabled():
            return None
        return float(self._before)

    @staticmethod
    def check_scale(scale: Any) -> float:
        """``scale`` from a saved state, checked: a positive number."""
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"state['grad_scaler_scale']: expected a positive number, got "
                             f"{scale!r}")
        return float(scale)

    def resume(self, scale: Any) -> None:
        """Compare the next update against ``scale`` (a saved :meth:`scale_before`)."""
        self._before = self.check_scale(scale)
