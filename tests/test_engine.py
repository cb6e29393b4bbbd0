"""The store's selection (exclude/include), compensation, loads and writes, against float64
references written from the EMA rule."""

from __future__ import annotations

import pytest
import torch
from internals import make_store
from torch import nn

from emakit._engine import views


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        for b in m.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    return m


def _drive(model, store, weights, averaged, copied):
    """Perturb every floating tensor, update; return the float64 references."""
    sd = model.state_dict()
    ref = {n: sd[n].double().clone() for n in averaged}
    g = torch.Generator().manual_seed(2)
    for w in weights:
        with torch.no_grad():
            for t in model.state_dict(keep_vars=True).values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g))
        store.update(w)
        sd = model.state_dict()
        for n in averaged:
            ref[n] = ref[n] + w * (sd[n].double() - ref[n])
        for n in copied:
            ref[n] = sd[n].double().clone()
    return ref


def _check(store, model, ref, stored):
    got = views.export(store)
    assert set(views.tensors(store)) == set(stored)
    sd = model.state_dict()
    for n, t in got.items():
        want = ref.get(n, sd[n].double())
        torch.testing.assert_close(t.double(), want, rtol=1e-5, atol=1e-5, msg=n)


def test_exclude_patterns_export_the_model_value():
    model = _model()
    store = make_store(model, exclude=["2.*", "*.running_var"])
    averaged = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean"]
    ref = _drive(model, store, [0.3, 0.1, 0.5], averaged, [])
    _check(store, model, ref, averaged)


def test_exclude_callable_and_include_buffers():
    model = _model()
    store = make_store(model, buffers="copy", include="1.running_mean",
                  exclude=lambda name, t: name == "0.bias")
    averaged = ["0.weight", "1.weight", "1.bias", "1.running_mean", "2.weight", "2.bias"]
    ref = _drive(model, store, [0.3, 0.1, 0.5], averaged, ["1.running_var"])
    _check(store, model, ref, averaged + ["1.running_var"])
    assert [e.kind.value for e in store.entries if e.name == "1.running_var"] == ["copy"]


@pytest.mark.parametrize("arg", ["exclude", "include"])
def test_pattern_matching_nothing_is_an_error(arg):
    with pytest.raises(ValueError, match=rf"{arg}: pattern\(s\) \['nope\.\*'\] match no"):
        make_store(_model(), **{arg: ["1.*", "nope.*"]})
    with pytest.raises(TypeError, match=arg):
        make_store(_model(), **{arg: 3})


def test_include_of_a_parameter_only_is_an_error():
    with pytest.raises(ValueError, match="include"):
        make_store(_model(), buffers="copy", include="0.weight")


def test_compensated_tracks_float64_where_fp32_freezes():
    """A weight at 1.0 moved to 1.001, tiny weights: a plain fp32 average never moves, the
    compensated one follows the float64 EMA."""
    plain_model, comp_model = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    for m in (plain_model, comp_model):
        with torch.no_grad():
            m.weight.fill_(1.0)
    plain, comp = make_store(plain_model), make_store(comp_model, compensated=True)
    for m in (plain_model, comp_model):
        with torch.no_grad():
            m.weight.fill_(1.001)
    w, ref = 1e-7, 1.0
    for _ in range(2000):
        plain.update(w)
        comp.update(w)
        ref = ref + w * (float(torch.tensor(1.001, dtype=torch.float32)) - ref)
    assert views.tensors(plain)["weight"].item() == 1.0  # frozen
    total = views.tensors(comp)["weight"].double() + views.compensation(comp)["weight"].double()
    assert abs(total.item() - ref) < 1e-3 * (ref - 1.0)
    assert comp.state_nbytes() == 2 * plain.state_nbytes()


def test_check_load_changes_nothing():
    model = _model()
    store = make_store(model)
    before = {n: t.clone() for n, t in views.tensors(store).items()}
    bad = {n: torch.zeros_like(t) for n, t in before.items()}
    bad["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"0\.weight: expected \(4, 3\)"):
        store.check_load(bad)
    with pytest.raises(ValueError, match="0.weight"):
        store.load(bad)
    ints = {n: torch.zeros_like(t, dtype=torch.int64) for n, t in before.items()}
    with pytest.raises(TypeError, match="floating"):
        store.load(ints)
    for n, t in views.tensors(store).items():
        assert torch.equal(t, before[n]), n


def test_copy_to_model_writes_the_average_for_good():
    model = _model()
    store = make_store(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    store.update(0.5)
    want = views.export(store)
    store.ensure()
    with torch.no_grad():
        for t, v in zip(*store.placement.swap_pairs(store.slots), strict=True):
            t.copy_(v)
    for n, t in model.state_dict().items():
        assert torch.equal(t, want[n]), n


def test_ema_passes_exclude_and_include_to_the_store():
    import emakit

    model = _model()
    ema = emakit.EMA(model, smoothing=0.5, buffers="copy", exclude="2.*",
                     include="*.running_mean")
    ema.update()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    got, sd = ema.ema_state_dict(), model.state_dict()
    assert torch.equal(got["2.weight"], sd["2.weight"])  # excluded: the model's value
    assert torch.allclose(got["0.weight"], sd["0.weight"] - 0.5)  # averaged
    assert "1.running_mean" in ema.state_dict()["average"]


def test_posthoc_load_state_dict_is_all_or_nothing(tmp_path):
    import emakit

    model = _model()
    ph = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=tmp_path)
    ph.step()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ph.step()
    state = ph.state_dict()
    before = [{n: t.clone() for n, t in views.tensors(s).items()} for s in ph._stores]
    bad = dict(state, averages=[{n: t + 1 for n, t in state["averages"][0].items()},
                                dict(state["averages"][1], **{"0.weight": torch.zeros(5, 3)})])
    with pytest.raises(ValueError, match=r"averages'\]\[1\].*0\.weight"):
        ph.load_state_dict(bad)
    bad_clock = dict(state, averages=[{n: t + 1 for n, t in a.items()}
                                      for a in state["averages"]], clock={"nope": 1})
    with pytest.raises((ValueError, KeyError, TypeError)):
        ph.load_state_dict(bad_clock)
    for store, want in zip(ph._stores, before, strict=True):
        for n, t in views.tensors(store).items():
            assert torch.equal(t, want[n]), n
    assert ph.num_updates == 2
