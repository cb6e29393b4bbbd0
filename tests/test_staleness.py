"""Never a stale average: the model's tensors change under the EMA; the average after the
change equals a float64 replay of the model's weights (carried over by name, a new tensor
starting as a copy), or the documented error names the tensor."""

from __future__ import annotations

import pytest
import torch
from internals import make_store, store_of
from torch import nn

import emakit
from emakit._engine import views

S = 0.6


class Replay:
    """float64 EMA of the model's averaged tensors, by name, written from the rule."""

    def __init__(self) -> None:
        self.avg: dict[str, torch.Tensor] = {}

    def update(self, model: nn.Module, names: list[str] | None = None) -> None:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        seen = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if not (t.is_floating_point() and (id(t) in trainable or name.endswith("running_mean")
                                               or name.endswith("running_var"))):
                continue
            if names is not None and name not in names:
                continue
            x = t.detach().double()
            seen[name] = S * self.avg[name] + (1 - S) * x if name in self.avg else x.clone()
        self.avg = seen

    def check(self, ema: emakit.EMA, atol: float = 1e-6) -> None:
        got = ema.ema_state_dict()
        for name, want in self.avg.items():
            err = (got[name].double() - want).abs().max().item()
            assert err <= atol * max(1.0, want.abs().max().item()), f"{name}: off by {err}"


def _perturb(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _run(model, ema, ref, g, steps=3):
    for _ in range(steps):
        _perturb(model, g)
        ema.update()
        ref.update(model)


def _setup(model):
    ema = emakit.EMA(model, smoothing=S)
    ref = Replay()
    ema.update()  # the start copy
    ref.update(model)
    return ema, ref, torch.Generator().manual_seed(4)


def test_load_state_dict_assign_is_followed():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    new = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    _run(model, ema, ref, g)
    ref.check(ema)
    with ema.swapped():  # the swap installs the current average, not a stale one
        assert torch.allclose(model[0].weight.double(), ref.avg["0.weight"], atol=1e-6)


def test_smoothing_zero_follows_a_replaced_parameter_exactly():
    model = nn.Linear(2, 2)
    ema = emakit.EMA(model, smoothing=0.0)
    ema.update()
    model.weight = nn.Parameter(torch.full((2, 2), 3.0))
    ema.update()
    assert torch.equal(ema.ema_state_dict()["weight"], torch.full((2, 2), 3.0))


def test_parameter_replaced_by_another_shape_is_a_clear_error_and_reset_recovers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    before = {k: v.clone() for k, v in ema.state_dict()["average"].items()}
    model[0].weight = nn.Parameter(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"0\.weight changed shape from \(4, 3\) to \(5, 3\)"):
        ema.update()
    with pytest.raises(ValueError, match="0.weight"):
        with ema.swapped():
            pass
    model[0].weight = nn.Parameter(torch.randn(4, 3))  # put a right-shaped tensor back
    after = ema.state_dict()["average"]
    for k in before:  # nothing was changed by the refused re-plan
        assert torch.equal(before[k], after[k]), k
    model[0].weight = nn.Parameter(torch.randn(5, 3))
    store_of(ema).reset()  # restarts every average from the model
    ref = Replay()
    ref.update(model)
    _run(model, ema, ref, g)
    ref.check(ema)


@pytest.mark.parametrize("where", [1, 2, 3])
def test_data_moved_in_the_middle_of_a_span(where):
    model = emakit.flatten_parameters(nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)]))
    ema, ref, g = _setup(model)
    assert len(store_of(ema).plan.main) == 1  # one span
    _run(model, ema, ref, g, steps=2)
    with torch.no_grad():
        model[where].weight.data = torch.full((3, 3), 5.0)
    _run(model, ema, ref, g)
    ref.check(ema)


def test_data_moved_while_the_old_storage_is_kept():
    model = emakit.flatten_parameters(nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)]))
    ema, ref, g = _setup(model)
    old = model[2].bias.data  # the user keeps the old view alive
    with torch.no_grad():
        model[2].bias.data = torch.full((3,), 5.0)
    _run(model, ema, ref, g)
    ref.check(ema)
    assert old.data_ptr() != model[2].bias.data_ptr()


def test_gathered_small_tensors_moved():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(10)])
    ema, ref, g = _setup(model)
    with torch.no_grad():
        model[4].weight.data = torch.randn(3, 3)
    _run(model, ema, ref, g)
    ref.check(ema)


def test_appended_layer_is_averaged_from_when_it_appears():
    model = nn.Sequential(nn.Linear(3, 3))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model.append(nn.Linear(3, 2))
    _run(model, ema, ref, g)
    ref.check(ema)
    assert "1.weight" in ema.state_dict()["average"]


def test_removed_tensor_is_dropped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ema, ref, g = _setup(model)
    model[1].bias = None
    _run(model, ema, ref, g)
    ref.check(ema)
    assert "1.bias" not in ema.state_dict()["average"]


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double"])
def test_dtype_changed_after_construction(convert):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # no buffers
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    getattr(model, convert)()
    _run(model, ema, ref, g)
    ref.check(ema, atol=1e-2 if convert != "double" else 1e-6)
    # storage kept at fp32, or widened to fp64 with the model (fp32 is a floor)
    stored = torch.float64 if convert == "double" else torch.float32
    assert ema.state_dict()["average"]["0.weight"].dtype == stored
    assert ema.ema_state_dict()["0.weight"].dtype == model[0].weight.dtype


def test_buffers_replaced_by_to_are_followed():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema, ref, g = _setup(model)
    model.train()
    for _ in range(2):
        model(torch.randn(8, 3, generator=g))
        _perturb(model, g)
        ema.update()
        ref.update(model)
    model.double()  # buffers replaced in the module dicts, behind torch's hooks
    for _ in range(2):
        model(torch.randn(8, 3, generator=g, dtype=torch.float64))
        _perturb(model, g)
        ema.update()
        ref.update(model)
    ref.check(ema)


def test_tensor_weight_equals_float_weight():
    torch.manual_seed(0)
    a = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)], nn.Linear(64, 64))
    b = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)], nn.Linear(64, 64))
    b.load_state_dict(a.state_dict())
    sa, sb = make_store(a), make_store(b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for w in (0.3, 0.01, 0.5):
        _perturb(a, g1)
        _perturb(b, g2)
        sa.update(w)
        sb.update(torch.tensor(w))
    for n, t in views.tensors(sa).items():
        torch.testing.assert_close(views.tensors(sb)[n], t, rtol=1e-6, atol=1e-7)


def test_no_replan_without_a_change():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    ema, _, g = _setup(model)
    plan = store_of(ema).plan
    nn.Linear(2, 2)  # a registration elsewhere in the process
    _perturb(model, g)
    ema.update()
    ema.module(torch.randn(2, 3))
    ema.update()
    assert store_of(ema).plan is plan


def test_reset_sees_unfrozen_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)
    ema, _, g = _setup(model)
    assert "1.weight" not in ema.state_dict()["average"]
    model[1].weight.requires_grad_(True)
    ema.reset()
    ema.update()
    ref = Replay()
    ref.update(model)
    _run(model, ema, ref, g)
    ref.check(ema)
    assert "1.weight" in ema.state_dict()["average"]
