"""Every fast path of Store.update against the plain path on random data.

The plain path is ``lerp_`` (below: torch's own lerp) tensor by tensor on an independent copy
of the average (same arithmetic, so bitwise), and a float64 reference within rounding.
"""

import copy

import pytest
import torch
from internals import make_store, store_of, tensors_of
from torch import nn

import emakit
from emakit._engine import plan as plan_mod
from emakit._engine import views
from emakit._engine.plan import Foreach, Gather, Staged


@torch.no_grad()
def lerp_(dst, src, weight):
    """The plain path, written apart from emakit: each source converted to its average's
    dtype and device, then torch's own ``_foreach_lerp_``."""
    torch._foreach_lerp_(list(dst), [s.to(device=d.device, dtype=d.dtype) for d, s in
                                     zip(dst, src, strict=True)], weight)

CUDA = torch.cuda.is_available()


def _net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Linear(7, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 5),
        nn.Linear(5, 3, bias=False),
        nn.LayerNorm(3),
    ).to(dtype)
    m[2].weight.requires_grad_(False)  # frozen: lives in the model only
    for b in m.buffers():
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    return m


def _perturb(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
                t.add_(noise.to(t.dtype))


def _reference(model: nn.Module, storage=torch.float32, buffers="average"):
    """name -> (plain-path average in ``storage``, float64 average) for the averaged tensors."""
    out = {}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point() and (id(t) in trainable or name.split(".")[-1].startswith("run")):
            out[name] = (t.detach().to(storage).clone(), t.detach().double().clone())
    return out


def _check(ema_model, ref_model, weights, storage=torch.float32, buffers="average", **kw):
    """Run the same random updates through a Store of ``ema_model`` and through the plain
    path on ``ref_model`` (a twin with the same values); compare."""
    sh = make_store(ema_model, dtype=storage, buffers=buffers, **kw)
    ref = _reference(ref_model, storage)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for w in weights:
        _perturb(ema_model, g1)
        _perturb(ref_model, g2)
        sh.update(w)
        sd = ref_model.state_dict()
        for name, (plain, exact) in ref.items():
            if buffers == "copy" and name.split(".")[-1].startswith("run"):
                plain.copy_(sd[name])
                exact.copy_(sd[name].double())
            else:
                lerp_([plain], [sd[name]], w)
                exact.lerp_(sd[name].double(), w)
    got = views.tensors(sh)
    assert set(got) == set(ref)
    for name, (plain, exact) in ref.items():
        assert torch.equal(got[name], plain), name
        torch.testing.assert_close(got[name].double(), exact, rtol=1e-5, atol=1e-5)
    return sh


WEIGHTS = [0.3, 0.01, 0.5, 0.999, 0.07]


def test_flatten_parameters_keeps_values_identity_and_flags():
    model = _net()
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    assert emakit.flatten_parameters(model) is model
    ptrs = set()
    for n, p in model.named_parameters():
        ident, value, flag = before[n]
        assert p is ident and p.requires_grad == flag and torch.equal(p, value)
        if flag:
            ptrs.add(p.untyped_storage().data_ptr())
    assert len(ptrs) == 1  # all trainable parameters in one buffer
    # the optimizer works on the views
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 7)).sum().backward()
    opt.step()
    assert model[0].weight.untyped_storage().data_ptr() in ptrs


def test_flatten_then_train_matches_unflattened_training():
    a, b = _net(), _net()
    emakit.flatten_parameters(b)
    oa = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=0.01)
    ob = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(6, 7)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=n)


def test_span_path_one_lerp_for_many_small_tensors_and_bitwise():
    model = nn.Sequential(*[nn.Linear(3, 5) for _ in range(40)])
    ref = copy.deepcopy(model)
    emakit.flatten_parameters(model)
    sh = _check(model, ref, WEIGHTS)
    ops = sh.plan.main
    assert len(ops) == 1 and isinstance(ops[0], Foreach) and len(ops[0].avg) == 1  # one span


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_span_path_mixed_model(buffers):
    model = _net()
    ref = copy.deepcopy(model)
    emakit.flatten_parameters(model)
    _check(model, ref, WEIGHTS, buffers=buffers)


def test_plain_model_direct_path():
    model = _net()
    _check(model, copy.deepcopy(model), WEIGHTS)


def test_staged_span_bf16_model_fp32_average(monkeypatch):
    # a tiny staging bound forces chunking and the splitting of a span into pieces
    monkeypatch.setattr(plan_mod, "STAGING_ELEMENTS_CPU", 32)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)]).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    emakit.flatten_parameters(model)
    sh = _check(model, ref, WEIGHTS, executor="eager")  # the fused executor stages nothing
    assert isinstance(sh.plan.main[0], Staged) and len(sh.plan.main[0].chunks) > 1
    assert all(t.numel() <= 32 for t in sh.plan.workspace)


def test_staged_plain_bf16_model(monkeypatch):
    monkeypatch.setattr(plan_mod, "STAGING_ELEMENTS_CPU", 40)
    model = _net(torch.bfloat16)
    _check(model, copy.deepcopy(model), WEIGHTS)


def test_user_flat_buffer_with_frozen_gap_is_not_one_span():
    """Sources in one buffer, but a frozen tensor sits between two trainable ones: the
    offsets do not match the average's, so the span must break (else the frozen values
    would be averaged into a neighbour)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight.requires_grad_(False)
    flat = torch.randn(sum(p.numel() for p in model.parameters()))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():  # packed without padding, frozen one included
            p.data = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
    ref = copy.deepcopy(model)
    _check(model, ref, WEIGHTS)


def test_moved_flat_parameters_are_detected():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    emakit.flatten_parameters(model)
    ref = copy.deepcopy(model)
    sh = make_store(model)
    with torch.no_grad():
        for p in model.parameters():  # storage moves, values kept
            p.data = p.data.clone()
    ref_avg = _reference(ref)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _perturb(model, g1)
    _perturb(ref, g2)
    sh.update(0.25)
    sd = ref.state_dict()
    for name, (plain, _) in ref_avg.items():
        lerp_([plain], [sd[name]], 0.25)
        assert torch.equal(views.tensors(sh)[name], plain), name


def _assert_same_averages(a, ea, b, eb, seed: int, steps: int) -> None:
    """Drive two models through the same random weights; their averages must be bitwise equal."""
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _perturb(a, g1)
        _perturb(b, g2)
        ea.step()
        eb.step()
    for (n, x), (_, y) in zip(
        ea.ema_state_dict().items(), eb.ema_state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), n


def test_ema_with_flattened_model_matches_plain_ema():
    a = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    b = copy.deepcopy(a)
    emakit.flatten_parameters(b)
    _assert_same_averages(
        a, emakit.EMA(a, half_life="3ba"), b, emakit.EMA(b, half_life="3ba"), seed=9, steps=7
    )


def test_side_stream_is_deprecated_and_runs_the_plain_path():
    a, b = _net(), _net()
    ea = emakit.EMA(a, smoothing=0.5)
    with pytest.warns(FutureWarning, match="side_stream"):
        eb = emakit.EMA(b, smoothing=0.5, side_stream=True)
    _assert_same_averages(a, ea, b, eb, seed=2, steps=3)


# CUDA ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _train_pair(ema_kwargs, steps=6, flatten=False):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    results = []
    for kw in ({}, ema_kwargs):
        model = copy.deepcopy(base).cuda()
        if flatten:
            emakit.flatten_parameters(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ema = emakit.EMA(model, half_life="2ba", **kw)
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(steps):
            x = torch.randn(8, 16, device="cuda", generator=g)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            ema.step()
        results.append((ema.ema_state_dict(), ema.state_dict()["average"]))
    return results


@cuda
@pytest.mark.filterwarnings("ignore:side_stream:FutureWarning")
@pytest.mark.parametrize("flatten", [False, True])
def test_cuda_deprecated_side_stream_bitwise_plain(flatten):
    (plain, plain_avg), (side, side_avg) = _train_pair({"side_stream": True}, flatten=flatten)
    for n in plain:
        assert torch.equal(plain[n], side[n]), n
    for n in plain_avg:
        assert torch.equal(plain_avg[n], side_avg[n]), n


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_cpu_average_bitwise_plain(dtype):
    """A CPU average of a CUDA model (pinned staging, non-blocking copies, CPU arithmetic on
    a worker thread) against the plain path: lerp_ on CPU copies, step by step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    model = model.to("cuda", dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = emakit.EMA(model, smoothing=0.7, device="cpu", compensated=False)
    ema.update()  # starts: average <- model
    names = list(tensors_of(ema))
    ref = {n: t.detach().float().cpu().clone() for n, t in model.state_dict().items()
           if n in names}
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 16, device="cuda", dtype=dtype)).square().mean().backward()
        opt.step()
        ema.update()
        sd = model.state_dict()
        lerp_([ref[n] for n in names], [sd[n].cpu() for n in names], 1.0 - 0.7)
    got = ema.state_dict()["average"]
    assert store_of(ema).workspace_nbytes() > 0
    for n in names:
        assert got[n].device.type == "cpu"
        assert torch.equal(got[n], ref[n]), n


@cuda
@pytest.mark.filterwarnings("ignore:side_stream:FutureWarning")
def test_cuda_in_place_writes_right_after_an_update_cannot_race():
    """The race the side stream had: weights written in place outside torch.optim right
    after ema.step() (a hand-written SGD step). Every update now runs on the current stream,
    so the average is the float64 replay's, with or without side_stream=True."""
    torch.manual_seed(0)
    model = nn.Linear(512, 512).cuda()
    for kw in ({}, {"side_stream": True}):
        with torch.no_grad():
            model.weight.normal_()
        ema = emakit.EMA(model, smoothing=0.5, **kw)
        ref = model.weight.detach().double().clone()
        for _ in range(4):
            ema.step()
            ref.lerp_(model.weight.detach().double(), 0.0 if _ == 0 else 0.5)
            with torch.no_grad():  # right after the update, no optimizer involved
                model.weight.mul_(-3.0).add_(1.0)
        torch.testing.assert_close(
            ema.state_dict()["average"]["weight"].double(), ref, rtol=1e-6, atol=1e-6
        )


def test_split_staging_sees_moved_parameters(monkeypatch):
    """A tensor larger than the staging bound is read through 1-D pieces made at plan time:
    replacing the parameter's storage must be noticed."""
    monkeypatch.setattr(plan_mod, "STAGING_ELEMENTS_CPU", 16)
    model = nn.Linear(8, 8).to(torch.bfloat16)
    sh = make_store(model)
    with torch.no_grad():
        model.weight.data = torch.randn(8, 8, dtype=torch.bfloat16)
    avg = model.weight.detach().float().clone()  # reference average, set below
    sh.load({"weight": avg, "bias": model.bias.detach().float()})
    with torch.no_grad():
        model.weight.data = torch.randn(8, 8, dtype=torch.bfloat16)
    sh.update(0.5)
    lerp_([avg], [model.weight.detach()], 0.5)
    assert torch.equal(views.tensors(sh)["weight"], avg)


def _small_and_big() -> nn.Module:
    layers = [nn.Linear(3, 5) for _ in range(12)] + [nn.Linear(64, 64)]
    layers += [nn.Linear(5, 3) for _ in range(12)]
    return nn.Sequential(*layers)


def test_gather_path_small_cpu_tensors_bitwise():
    model = _small_and_big()
    sh = _check(model, copy.deepcopy(model), WEIGHTS)
    kinds = [type(op) for op in sh.plan.main]
    assert kinds.count(Gather) == 2 and Foreach in kinds  # the big layer breaks the run


def test_gather_runs_split_at_the_staging_bound(monkeypatch):
    monkeypatch.setattr(plan_mod, "STAGING_ELEMENTS_CPU", 160)
    model = nn.Sequential(*[nn.Linear(3, 5) for _ in range(40)])
    sh = _check(model, copy.deepcopy(model), WEIGHTS)
    gathers = [op for op in sh.plan.main if isinstance(op, Gather)]
    assert len(gathers) > 1 and all(op.staging.numel() <= 160 for op in gathers)
    # the runs share one staging buffer
    assert len({op.staging.untyped_storage().data_ptr() for op in gathers}) == 1
    assert sh.workspace_nbytes() <= 160 * 4


def test_gather_sees_moved_parameters():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(10)])
    sh = make_store(model)
    assert isinstance(sh.plan.main[0], Gather)
    avg = {n: t.clone() for n, t in views.tensors(sh).items()}
    with torch.no_grad():
        model[4].weight.data = torch.randn(3, 3)  # one parameter's storage replaced
    sh.update(0.5)
    sd = model.state_dict()
    for n, t in avg.items():
        lerp_([t], [sd[n]], 0.5)
        assert torch.equal(views.tensors(sh)[n], t), n


@cuda
@pytest.mark.parametrize("device", [None, "cpu"])
def test_cuda_tensor_weight_equals_float_weight(device):
    """A 0-d CUDA weight (the GradScaler mask's form) gives the float weight's average on
    the plain path and through a CPU offload (copied to a pinned host scalar, no sync)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).cuda()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    sa, sb = make_store(a, device=device), make_store(b, device=device)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for w in (0.3, 0.01, 0.5):
        _perturb(a.cpu(), g1)
        _perturb(b.cpu(), g2)
        a.cuda()
        b.cuda()
        sa.update(w)
        sb.update(torch.tensor(w, device="cuda"))
    sa.synchronize()
    sb.synchronize()
    for n, t in views.tensors(sa).items():
        torch.testing.assert_close(views.tensors(sb)[n], t, rtol=1e-6, atol=1e-7)
