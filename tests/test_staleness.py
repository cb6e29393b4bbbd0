"""Never a stale average: the model's tensors change under the EMA; the average after the
change equals a float64 replay of the model's weights (carried over by name, a new tensor
starting as a copy), or the documented error names the tensor."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from internals import make_store, store_of
from multiproc import SMOOTHING, assert_close, launch
from staleness_worker import STEPS, UNFREEZE
from torch import nn

import emakit
from emakit._engine import views

S = 0.6


class Replay:
    """float64 EMA of the model's averaged tensors, by name, written from the rule: trainable
    parameters and floating buffers are averaged, a name new to the average starts as a
    copy, a parameter averaged once stays averaged while the model has it (frozen or not),
    a name the model no longer has is dropped."""

    def __init__(self) -> None:
        self.avg: dict[str, torch.Tensor] = {}

    def update(self, model: nn.Module, names: list[str] | None = None) -> None:
        params = {id(p): p.requires_grad for p in model.parameters()}
        seen = {}
        for name, t in model.state_dict(keep_vars=True).items():
            frozen = id(t) in params and not params[id(t)] and name not in self.avg
            if not t.is_floating_point() or frozen:
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


# registrations: only this model's own can make the store look again ----------------------


def _valid(ema) -> bool:
    return store_of(ema).plan.watch.valid()


def test_registrations_elsewhere_leave_the_plan_valid():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    plan = store_of(ema).plan
    for _ in range(3):
        loss = nn.CrossEntropyLoss()  # a loss, a layer, a model built per step
        other = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        other.register_buffer("extra", torch.zeros(2))
        other[0].weight = nn.Parameter(torch.ones(2, 2))
        peer = torch.optim.swa_utils.AveragedModel(model)  # another EMA library's copy
        peer.update_parameters(model)
        assert _valid(ema)  # nothing to look at again: no re-classification
        _perturb(model, g)
        ema.update()
        ref.update(model)
    del loss, other, peer
    assert store_of(ema).plan is plan
    ref.check(ema)


def test_the_same_parameter_registered_again_is_nothing():
    """FSDP1 with use_orig_params=True sets its original parameters again after every
    forward (delattr, then setattr of the same Parameter objects)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    plan = store_of(ema).plan
    for _ in range(2):
        for m in model:
            for name, p in list(m._parameters.items()):
                delattr(m, name)
                setattr(m, name, p)
            m.register_parameter("weight", m.weight)
        model[0] = model[0]  # the same layer under its own name
        assert _valid(ema)
        _perturb(model, g)
        ema.update()
        ref.update(model)
    assert store_of(ema).plan is plan
    ref.check(ema)


def test_non_persistent_buffers_registered_per_step_are_nothing():
    """A cache registered in the forward pass (rotary tables) is not in the state dict."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    for _ in range(2):
        model[0].register_buffer("cache", torch.randn(4), persistent=False)
        assert _valid(ema)
        _perturb(model, g)
        ema.update()
        ref.update(model)
    model[0].register_buffer("cache", model[0].cache, persistent=True)  # joins the state
    assert not _valid(ema)
    _run(model, ema, ref, g)
    assert "0.cache" in ema.state_dict()["average"]
    ref.check(ema)


def test_a_buffer_made_non_persistent_leaves_the_average():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema, ref, g = _setup(model)
    bn = model[1]
    bn.register_buffer("running_mean", bn.running_mean, persistent=False)  # same tensor
    _run(model, ema, ref, g)
    assert "1.running_mean" not in ema.state_dict()["average"]
    assert "1.running_mean" not in ema.ema_state_dict()


def test_a_layer_built_apart_then_attached_joins():
    model = nn.Sequential(nn.Linear(3, 3))
    ema, ref, g = _setup(model)
    layer = nn.Linear(3, 2)  # registrations on a module outside the model: forgotten
    assert _valid(ema)
    model.add_module("head", layer)  # registered on the model: seen
    _run(model, ema, ref, g)
    ref.check(ema)
    assert "head.weight" in ema.state_dict()["average"]


def test_a_parameter_registered_on_a_layer_of_the_model_joins():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ema, ref, g = _setup(model)
    model[1].scale = nn.Parameter(torch.ones(2))
    _run(model, ema, ref, g)
    ref.check(ema)
    assert "1.scale" in ema.state_dict()["average"]


def test_a_buffer_replaced_behind_the_hooks_is_followed():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema, ref, g = _setup(model)
    model[1]._buffers["running_var"] = torch.full((4,), 7.0)  # no hook runs
    _run(model, ema, ref, g)
    ref.check(ema)


def _renamed(ref: Replay, names: dict[str, str]) -> None:
    """The replay's averages moved with their layers: new prefix -> old prefix."""
    ref.avg = {new + k[len(old):]: v for new, old in names.items()
               for k, v in ref.avg.items() if k.startswith(old)}


@pytest.mark.parametrize("how", ["del", "pop", "moduledict", "insert", "modulelist_insert"])
def test_layers_deleted_or_inserted_without_hooks_are_followed(how):
    """``del``, ``pop`` and ``insert`` change a container's children without any hook, and a
    Sequential or ModuleList renumbers: each layer keeps its own average under its new name,
    an inserted one starts as a copy."""
    torch.manual_seed(0)
    if how == "moduledict":
        model: nn.Module = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    elif how == "modulelist_insert":
        model = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
    else:
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    if how == "del":
        del model[1]
        _renamed(ref, {"0.": "0.", "1.": "2."})
    elif how == "pop":
        model.pop(0)
        _renamed(ref, {"0.": "1.", "1.": "2."})
    elif how == "moduledict":
        del model["a"]
        _renamed(ref, {"b.": "b."})
    elif how == "insert":
        model.insert(1, nn.Linear(3, 3))
        _renamed(ref, {"0.": "0.", "2.": "1.", "3.": "2."})  # "1." new: a copy
    else:
        model.insert(0, nn.Linear(3, 3))
        _renamed(ref, {"1.": "0.", "2.": "1."})
    _run(model, ema, ref, g)
    ref.check(ema)
    assert sorted(ema.state_dict()["average"]) == sorted(model.state_dict())
    assert sorted(ema.ema_state_dict()) == sorted(model.state_dict())


def test_layers_swapped_keep_their_own_averages():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model[0], model[1] = model[1], model[0]
    _renamed(ref, {"0.": "1.", "1.": "0."})
    _run(model, ema, ref, g)
    ref.check(ema)


def test_a_layer_replaced_by_a_new_one_keeps_the_average_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model[1] = nn.Linear(3, 2)
    _run(model, ema, ref, g)
    ref.check(ema)


# training starts and stops: requires_grad is watched ---------------------------------------


def _backbone_frozen() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a backbone frozen for the first steps
    return model


def test_a_parameter_that_starts_training_joins_the_average():
    model = _backbone_frozen()
    ema, ref, g = _setup(model)
    plan = store_of(ema).plan
    _run(model, ema, ref, g)
    assert store_of(ema).plan is plan  # frozen parameters cost no re-plan
    assert "0.weight" not in ema.state_dict()["average"]
    model[0].requires_grad_(True)
    _run(model, ema, ref, g, steps=1)  # a copy of its value at this update
    assert torch.equal(ema.ema_state_dict()["0.weight"], model[0].weight)
    _run(model, ema, ref, g, steps=3)  # averaged from then on
    ref.check(ema)  # and the other averages carried on, not restarted
    assert "0.weight" in ema.state_dict()["average"]


def test_a_parameter_that_starts_training_is_copied_when_first_seen():
    """An export before the next update sees it first: the copy is taken there."""
    model = _backbone_frozen()
    ema, ref, g = _setup(model)
    model[0].requires_grad_(True)
    assert torch.equal(ema.ema_state_dict()["0.weight"], model[0].weight)
    ref.avg["0.weight"] = model[0].weight.detach().double()
    ref.avg["0.bias"] = model[0].bias.detach().double()
    _run(model, ema, ref, g)
    ref.check(ema)


def test_a_tied_parameter_that_starts_training_joins_under_every_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model[0].weight.requires_grad_(True)
    _run(model, ema, ref, g)
    ref.check(ema)
    assert "0.weight" in ema.state_dict()["average"]


def test_a_parameter_that_stops_training_keeps_being_averaged():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model[0].requires_grad_(False)
    for _ in range(3):
        nn.Linear(2, 2)  # a registration elsewhere changes nothing either
        _perturb(model, g)  # moves the trained layer only
        ema.update()
        ref.update(model)
    ref.check(ema)  # the frozen layer's average moves on toward the value it keeps
    average = ema.ema_state_dict()["0.weight"]
    assert not torch.equal(average, model[0].weight)
    model[0].requires_grad_(True)  # and training again continues the same average
    _run(model, ema, ref, g)
    ref.check(ema)


def test_reset_drops_a_parameter_that_stopped_training():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model[0].requires_grad_(False)
    _run(model, ema, ref, g)
    ema.reset()
    assert "0.weight" not in ema.state_dict()["average"]
    assert torch.equal(ema.ema_state_dict()["0.weight"], model[0].weight)


def test_a_run_resumed_after_a_parameter_stopped_training_continues_exactly():
    """The saved average of a parameter frozen since is taken (the resumed model has it
    frozen): the resumed run equals the one that never stopped, bitwise."""
    import copy

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    model[0].requires_grad_(False)
    _run(model, ema, ref, g)
    saved, again = ema.state_dict(), copy.deepcopy(model)
    resumed = emakit.EMA(again, smoothing=S)
    resumed.load_state_dict(saved)
    g2 = copy.deepcopy(g)
    _run(model, ema, ref, g)
    _run(again, resumed, Replay(), g2)
    ref.check(resumed)
    for name, t in ema.state_dict()["average"].items():
        assert torch.equal(resumed.state_dict()["average"][name], t), name


def test_a_state_without_a_frozen_parameter_leaves_it_live():
    """A state saved while the backbone was still frozen, loaded after it trained and was
    frozen again: the state decides, the backbone is read from the model."""
    model = _backbone_frozen()
    ema, ref, g = _setup(model)
    _run(model, ema, ref, g)
    early = ema.state_dict()
    model[0].requires_grad_(True)
    _run(model, ema, ref, g)
    model[0].requires_grad_(False)
    _run(model, ema, ref, g)
    assert "0.weight" in ema.state_dict()["average"]
    ema.load_state_dict(early)
    got = ema.ema_state_dict()
    for name, t in early["average"].items():
        assert torch.equal(got[name], t), name
    assert torch.equal(got["0.weight"], model[0].weight)
    assert sorted(ema.state_dict()["average"]) == sorted(early["average"])


def test_a_copied_average_watches_its_own_model():
    import copy

    model = nn.Sequential(nn.Linear(3, 3))
    ema, ref, g = _setup(model)
    twin = copy.deepcopy(ema)  # its own copy of the model
    copied = store_of(twin).model
    assert copied is not model
    copied[0].scale = nn.Parameter(torch.ones(3))  # seen by the registration hooks only
    _perturb(copied, g)
    twin.update()
    ref.update(copied)
    ref.check(twin)
    assert "0.scale" in twin.state_dict()["average"]


def test_an_excluded_parameter_that_starts_training_stays_live():
    model = _backbone_frozen()
    ema = emakit.EMA(model, smoothing=S, exclude="0.*")
    ema.update()
    plan = store_of(ema).plan
    model[0].requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        _perturb(model, g)
        ema.update()
        assert _valid(ema)  # looked at once, then accepted
    assert store_of(ema).plan is plan
    assert torch.equal(ema.ema_state_dict()["0.weight"], model[0].weight)


WORKER = Path(__file__).with_name("staleness_worker.py")


def _replay_joining(weights: list[dict[str, torch.Tensor]],
                    joined: dict[str, int]) -> dict[str, torch.Tensor]:
    """The float64 EMA of the full weights after each update (the first is the start copy):
    a name is averaged from update ``joined.get(name, 0)`` on, starting as a copy of its
    value there; before that its value is the model's."""
    avg: dict[str, torch.Tensor] = {}
    for k, state in enumerate(weights):
        for name, w in state.items():
            w64 = w.double()
            if k <= joined.get(name, 0):
                avg[name] = w64.clone()
            else:
                avg[name] = SMOOTHING * avg[name] + (1 - SMOOTHING) * w64
    return avg


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("scenarios", ["fsdp1,fsdp2", "zero3"])
def test_a_sharded_parameter_that_starts_training_joins(scenarios, tmp_path):
    """FSDP1 (``use_orig_params=True``: its re-registrations in every forward make the
    store look at nothing), FSDP2 and ZeRO-3 on 2 gloo processes: the first layer, frozen
    when the EMA is built, starts training at step UNFREEZE."""
    env = {"CUDA_VISIBLE_DEVICES": ""}
    if scenarios == "zero3":
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("DeepSpeed is not installed (pip install emakit[deepspeed])")
        env["DS_ACCELERATOR"] = "cpu"
        code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"  # cached
        subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), check=True,
                       timeout=900, capture_output=True)
    first, *rest = scenarios.split(",")
    launch(WORKER, scenarios, tmp_path, 2, env=env, result=first)
    for scenario in [first, *rest]:
        result = torch.load(tmp_path / f"{scenario}.pt", weights_only=True)
        want = _replay_joining(result["weights"], {"0.weight": UNFREEZE, "0.bias": UNFREEZE})
        assert_close(result["average"], want)
        late = ["0.bias", "0.weight"]
        assert all(set(late).isdisjoint(n) for n in result["averaged"][:UNFREEZE]), scenario
        assert all(set(late) <= set(n) for n in result["averaged"][UNFREEZE:]), scenario
        # classified at the start (update 1) and when the layer started training, never else
        assert result["classified"] == [1] + [0] * (UNFREEZE - 1) + [1] + [0] * (
            STEPS - UNFREEZE - 1), (scenario, result["classified"])
