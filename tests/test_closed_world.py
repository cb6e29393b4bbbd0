"""A closed world (issue 19, item 1): every floating tensor that trains is averaged, excluded
by the user, or named in a ValueError that says what to do; never silently left live.

Each refusal below was measured on 22b934d, where the tensor was silently left live (its
"average" was the model's current value at every export) or crashed inside torch: a
trainable complex parameter, a sparse or nested one, a tensor subclass, a float8 tensor, a
parameter missing from the state dict. Frozen parameters and integer buffers stay live and
are stored once. BEMA on a model with nothing to average raised torch's "Tensor list must
have at least one tensor" there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import emakit
from emakit.flat import align

FACES = [
    pytest.param(lambda m, **kw: emakit.EMA(m, **kw), id="EMA"),
    pytest.param(lambda m, **kw: emakit.BEMA(m, **kw), id="BEMA"),
    pytest.param(lambda m, **kw: emakit.PostHocEMA(m, snapshot_every=None, **kw), id="PostHocEMA"),
]


class Holder(nn.Module):
    """A linear layer plus one more tensor ``extra`` (a parameter or a buffer)."""

    def __init__(self, extra: torch.Tensor, param: bool = True, requires_grad: bool = True):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        if param:
            self.extra = nn.Parameter(extra, requires_grad=requires_grad)
        else:
            self.register_buffer("extra", extra)


class Subclass(torch.Tensor):
    """A tensor subclass emakit knows nothing about (as torchao's or a user's would be)."""


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "prototype stage", "beta state"
        return make()


def _nested() -> torch.Tensor:
    return _quiet(lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]))


UNKNOWN = [
    pytest.param(lambda: torch.randn(3, dtype=torch.complex64), "complex", id="complex"),
    pytest.param(lambda: torch.randn(3, 3).to_sparse(), "sparse", id="sparse-coo"),
    pytest.param(lambda: _quiet(torch.randn(3, 3).to_sparse_csr), "sparse", id="sparse-csr"),
    pytest.param(_nested, "nested", id="nested"),
    pytest.param(lambda: torch.randn(3).as_subclass(Subclass), "subclass", id="subclass"),
    pytest.param(lambda: torch.randn(3).to(torch.float8_e4m3fn), "float8", id="float8"),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("make, what", UNKNOWN)
def test_a_trainable_tensor_of_an_unknown_kind_is_refused_by_name(face, make, what):
    model = Holder(make())
    assert model.extra.requires_grad
    with pytest.raises(ValueError, match=r"model: extra .*exclude=\['extra'\]") as err:
        face(model)
    assert what in str(err.value) or what == "float8" and "float8_e4m3fn" in str(err.value)


@pytest.mark.parametrize("face", FACES)
def test_a_model_whose_only_trainable_tensor_is_unknown_is_no_silent_pass_through(face):
    """On 22b934d this EMA had an empty average and every export gave the live weights."""
    model = nn.Module()
    model.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="model: phase is a complex parameter"):
        face(model)


@pytest.mark.parametrize("make, what", UNKNOWN)
def test_an_excluded_tensor_of_an_unknown_kind_is_exported_from_the_model(make, what):
    model = Holder(make())
    ema = emakit.EMA(model, half_life="2ba", exclude="extra")
    for _ in range(3):
        with torch.no_grad():
            model.lin.weight.add_(1.0)
        ema.step()
    assert "extra" not in ema.state_dict()["average"]
    exported = ema.ema_state_dict()
    assert exported["extra"] is not model.extra  # a copy, of the model's own value
    assert type(exported["extra"]) is type(model.extra.detach())
    assert exported["extra"].layout == model.extra.layout


@pytest.mark.parametrize("make, what", [u for u in UNKNOWN if u.id != "float8"])
def test_a_frozen_tensor_of_an_unknown_kind_stays_live(make, what):
    """Frozen parameters are never averaged: whatever they hold, exports read the model."""
    model = Holder(make(), requires_grad=False)
    ema = emakit.EMA(model, half_life="2ba")
    ema.step()
    assert sorted(ema.state_dict()["average"]) == ["lin.bias", "lin.weight"]
    assert "extra" in ema.ema_state_dict()


@pytest.mark.parametrize("make, what", [
    pytest.param(lambda: torch.randn(3).to(torch.float8_e5m2), "float8", id="float8"),
    pytest.param(lambda: torch.randn(3, 3).to_sparse(), "sparse", id="sparse"),
    pytest.param(lambda: torch.randn(3).as_subclass(Subclass), "subclass", id="subclass"),
])
@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_a_floating_buffer_of_an_unknown_kind_is_refused(make, what, buffers):
    """Floating buffers are stored (averaged or copied): the same refusals apply."""
    with pytest.raises(ValueError, match=r"model: extra .*exclude=\['extra'\]"):
        emakit.EMA(Holder(make(), param=False), buffers=buffers)


def test_complex_and_quantized_buffers_stay_live():
    """Buffers that are not real floating tensors (integer, bool, complex, quantized) are
    taken from the model, as ``num_batches_tracked`` is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized creation is deprecated
        q = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)
    for extra in (torch.randn(3, dtype=torch.complex64), q, torch.ones(2, dtype=torch.bool)):
        model = Holder(extra, param=False)
        ema = emakit.EMA(model, half_life="2ba")
        ema.step()
        ema.step()
        assert "extra" not in ema.state_dict()["average"]
        exported = ema.ema_state_dict()["extra"]
        assert exported.dtype == extra.dtype and exported.equal(model.extra)


class Hidden(nn.Module):
    """A module whose state dict leaves out one of its trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.secret = nn.Parameter(torch.ones(3))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "secret")


def test_a_trainable_parameter_missing_from_the_state_dict_is_named():
    model = nn.Sequential(Hidden())
    with pytest.raises(ValueError, match=r"model: 0.secret trains but is not in "
                                         r"model.state_dict\(\).*exclude=\['0.secret'\]"):
        emakit.EMA(model)
    ema = emakit.EMA(model, exclude="0.secret")  # the user's choice: then it is not averaged
    assert sorted(ema.state_dict()["average"]) == ["0.lin.bias", "0.lin.weight"]


def test_a_parameter_of_an_unknown_kind_added_later_is_refused_at_the_next_update():
    """The store plans again when the model changes: the closed world holds then too."""
    model = nn.Linear(2, 2)
    ema = emakit.EMA(model, half_life="2ba")
    ema.step()
    model.extra = nn.Parameter(torch.randn(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="model: extra is a complex parameter"):
        ema.step()


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
    "conv-bn": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4)),
    "rnn": lambda: nn.ModuleDict({"lstm": nn.LSTM(4, 3, num_layers=2), "gru": nn.GRU(3, 2)}),
    "transformer": lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), num_layers=2,
        enable_nested_tensor=False),
    "embedding": lambda: nn.ModuleDict({
        "emb": nn.Embedding(10, 4), "bag": nn.EmbeddingBag(5, 3), "ln": nn.LayerNorm(4),
        "attn": nn.MultiheadAttention(4, 2)}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("face", FACES)
def test_every_trainable_tensor_of_common_models_is_averaged(name, face):
    """What torch says trains (``named_parameters`` with ``requires_grad``) is exactly what
    is averaged, together with the floating buffers; nothing else is stored."""
    model = MODELS[name]()
    for p in list(model.parameters())[::3]:
        p.requires_grad_(False)  # some frozen, left live
    averager = face(model)
    averager.step()
    state = averager.state_dict()
    stored = state["average"] if "average" in state else state["averages"][0]
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    floating = {n for n, b in model.named_buffers() if b.is_floating_point()}
    assert set(stored) == trains | floating
    assert trains  # the model has something to average, so the average is not empty


@pytest.mark.parametrize("executor", ["eager", "fused"])
@pytest.mark.parametrize("case", ["buffers-only", "all-frozen", "all-excluded", "no-tensors"])
def test_bema_with_nothing_to_correct(case, executor):
    """BEMA corrects parameters; a model whose averaged tensors are all buffers (or that has
    nothing to average) still steps, and hands out the plain average of its buffers."""
    model = {
        "buffers-only": lambda: nn.BatchNorm1d(3, affine=False),
        "all-frozen": lambda: nn.Linear(2, 2).requires_grad_(False),
        "all-excluded": lambda: nn.Linear(2, 2),
        "no-tensors": lambda: nn.ReLU(),
    }[case]()
    kwargs = {"exclude": "*"} if case == "all-excluded" else {}
    bema = emakit.BEMA(model, executor=executor, **kwargs)
    for _ in range(4):
        if case == "buffers-only":
            model.train()
            model(torch.randn(5, 3))
        bema.step()
    assert bema.num_updates == 4
    exported = bema.ema_state_dict()
    assert sorted(exported) == sorted(model.state_dict())
    if case == "buffers-only":  # running_mean averaged (not copied): it lags the model's
        assert not torch.equal(exported["running_mean"], model.running_mean)
    else:
        for n, t in model.state_dict().items():
            assert torch.equal(exported[n], t)


def test_frozen_parameters_and_integer_buffers_are_stored_once():
    """Exports read them from the model (so a change to the model shows), and the average
    holds no copy of them: ``nbytes`` counts only what is averaged."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[0].weight.requires_grad_(False)
    ema = emakit.EMA(model, half_life="2ba", compensated=False, dtype=torch.float32)
    stored = sorted(ema.state_dict()["average"])
    assert stored == ["0.bias", "1.bias", "1.running_mean", "1.running_var", "1.weight"]
    assert ema.nbytes() == 4 * sum(align(n) for n in (4, 4, 4, 4, 4))
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    model[1].num_batches_tracked.fill_(7)
    ema.step()
    out = ema.ema_state_dict()
    assert torch.equal(out["0.weight"], model[0].weight.detach())
    assert out["1.num_batches_tracked"].item() == 7
