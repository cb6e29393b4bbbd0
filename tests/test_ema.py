"""Buffers, dtypes, swapping, exports, wrappers, skipping and the teacher module."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from internals import store_of, tensors_of
from reference import closed_form, flat_params, flat_state, set_random_weights
from torch import nn

import emakit


class Net(nn.Module):
    """Linear + BatchNorm + a frozen layer + a tied pair of weights."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(8, 8, bias=False)
        self.dec = nn.Linear(8, 8, bias=False)
        self.dec.weight = self.out.weight  # tied

    def forward(self, x):
        return self.dec(self.out(self.frozen(torch.relu(self.bn(self.inp(x))))))


def _train(model, ema, steps, seed=0, lr=0.1):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen).to(device)  # the same inputs on any device
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.step()
    return opt


# BatchNorm and integer buffers -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["average", "copy"])
def test_batchnorm_buffers(mode):
    model = Net()
    ema = emakit.EMA(model, smoothing=0.8, buffers=mode)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(12):
        model(torch.randn(16, 6, generator=gen))  # train-mode forward moves running stats
        history.append(model.bn.running_mean.detach().double().clone())
        ema.step()
    got = ema.ema_state_dict()["bn.running_mean"].double()
    if mode == "average":
        expected = closed_form(history[0], [(0.8, h) for h in history[1:]])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, history[-1])
    else:
        assert torch.equal(got, history[-1])


def test_num_batches_tracked_copied_exactly():
    model = Net()
    big = 2**53 + 1  # not representable in float32 or float64: any float trip would change it
    model.bn.num_batches_tracked.fill_(big)
    ema = emakit.EMA(model, smoothing=0.5)
    _train(model, ema, 3)
    value = ema.ema_state_dict()["bn.num_batches_tracked"]
    assert value.dtype == torch.int64
    assert int(value) == big + 3
    assert "bn.num_batches_tracked" not in ema.state_dict()["average"]


# dtypes -----------------------------------------------------------------------------------


def test_bf16_model_fp32_average_keeps_moving():
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    s = 0.999
    ema32 = emakit.EMA(model, smoothing=s)  # dtype=float32, the default
    ema16 = emakit.EMA(model, smoothing=s, dtype=None, compensated=False)  # plain bf16
    base = model.weight.detach().clone()
    ema32.step()
    ema16.step()
    init = flat_params(model)
    updates = []
    for t in range(1, 301):
        with torch.no_grad():
            # A slow drift: half the weight's size over the run, in bf16 steps.
            model.weight.copy_(base * (1 + 0.5 * t / 300))
        updates.append((s, flat_params(model)))
        ema32.step()
        ema16.step()
    expected = closed_form(init, updates)
    names = [n for n, _ in model.named_parameters()]
    got32 = torch.cat([tensors_of(ema32)[n].double().reshape(-1) for n in names])
    got16 = torch.cat([tensors_of(ema16)[n].double().reshape(-1) for n in names])
    moved = (expected - init).abs()
    assert moved.max() > 0.01 * init.abs().max()  # the reference did move
    torch.testing.assert_close(got32, expected, rtol=1e-5, atol=1e-6)
    # The bf16 average loses each update below its rounding step: it stands still.
    stalled = (got16 - init).abs() <= 0.05 * moved
    assert stalled.float().mean() > 0.9
    assert tensors_of(ema32)["weight"].dtype == torch.float32
    assert ema32.ema_state_dict()["weight"].dtype == torch.bfloat16


def test_device_cpu_holds_the_average_there():
    model = Net()
    ema = emakit.EMA(model, device="cpu")
    assert all(t.device.type == "cpu" for t in tensors_of(ema).values())
    assert all(f.device.type == "cpu" for f in store_of(ema).flat.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cpu_for_a_cuda_model():
    model = Net().cuda()
    ema = emakit.EMA(model, device="cpu", smoothing=0.5)
    names = list(tensors_of(ema))
    ref = None
    for seed in range(3):  # one step each; a float64 replay of the average beside it
        _train(model, ema, 1, seed=seed)
        sd = {n: t.detach().double().cpu() for n, t in model.state_dict().items()}
        ref = {n: sd[n].clone() for n in names} if ref is None else {
            n: ref[n].lerp(sd[n], 0.5) for n in names}
    got = ema.state_dict()["average"]
    assert all(t.device.type == "cpu" for t in tensors_of(ema).values())
    for n in names:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-6, atol=1e-6)
    assert model.state_dict().keys() == ema.ema_state_dict().keys()


# swapped ----------------------------------------------------------------------------------


def test_swapped_uses_average_and_restores_bitwise():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.9)
    opt = _train(model, ema, 10)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    fresh = Net()
    fresh.load_state_dict(ema.ema_state_dict())
    fresh.eval()
    model.eval()
    x = torch.randn(4, 6)
    with ema.swapped() as swapped_model:
        assert swapped_model is model
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert [id(p) for p in model.parameters()] == ids
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]


def test_swapped_restores_when_the_block_raises():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.9)
    _train(model, ema, 5)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(KeyError), ema.swapped():
        assert not torch.equal(model.inp.weight, before["inp.weight"])
        raise KeyError("boom")
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_nested_swap_is_an_error():
    model = Net()
    ema = emakit.EMA(model)
    _train(model, ema, 2)
    with ema.swapped():
        with pytest.raises(RuntimeError, match="nested"):
            with ema.swapped():
                pass
        with pytest.raises(RuntimeError, match="swapped"):
            ema.update()


# exports ----------------------------------------------------------------------------------


def test_ema_state_dict_loads_strict_into_a_fresh_model():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.7)
    _train(model, ema, 6)
    sd = ema.ema_state_dict()
    assert list(sd) == list(model.state_dict())
    fresh = Net()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.frozen.weight, model.frozen.weight)
    assert fresh.dec.weight is fresh.out.weight
    assert not torch.equal(fresh.inp.weight, model.inp.weight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_ddp_or_compile_prefix():
    import torch.distributed as dist

    model = Net()
    compiled = torch.compile(model)
    names = emakit.EMA(compiled).ema_state_dict().keys()
    assert list(names) == list(model.state_dict())

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert all(n.startswith("module.") for n in ddp.state_dict())
        ema = emakit.EMA(ddp, smoothing=0.5)
        _train(ddp, ema, 3)
        sd = ema.ema_state_dict()
        assert not any(n.startswith(("module.", "_orig_mod.")) for n in sd)
        Net().load_state_dict(sd, strict=True)
    finally:
        dist.destroy_process_group()


def test_copy_to_writes_the_average():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.6)
    _train(model, ema, 4)
    expected = ema.ema_state_dict()
    other = Net()
    ema.copy_to(other)
    ema.copy_to()
    for n, t in expected.items():
        assert torch.equal(other.state_dict()[n], t)
        assert torch.equal(model.state_dict()[n], t)


# skip_nonfinite ---------------------------------------------------------------------------


def test_skip_nonfinite_leaves_the_average_unchanged():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.9, skip_nonfinite=True)
    _train(model, ema, 3)
    before = {n: t.clone() for n, t in tensors_of(ema).items()}
    with torch.no_grad():
        model.inp.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN"):
        ema.step()
    assert ema.skipped_updates == 1
    assert ema.num_updates == 3  # the start copy, one update, one skipped
    for n, t in tensors_of(ema).items():
        assert torch.equal(t, before[n]), n
    with torch.no_grad():
        model.inp.weight[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning):
        ema.step()
    assert ema.skipped_updates == 2


def test_without_skip_nonfinite_nan_propagates():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.9)
    _train(model, ema, 2)
    with torch.no_grad():
        model.inp.weight[0, 0] = float("nan")
    ema.step()
    assert torch.isnan(tensors_of(ema)["inp.weight"][0, 0])


# the teacher module -----------------------------------------------------------------------


def test_module_computes_with_the_average_without_touching_training_weights():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.8)
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(8):
        x = torch.randn(16, 6, generator=gen)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        teacher_out = ema.module(x)
        for n, t in model.state_dict().items():
            assert torch.equal(t, before[n]), n
        reference = Net()
        reference.load_state_dict(ema.ema_state_dict())
        reference.eval()
        torch.testing.assert_close(teacher_out, reference(x), rtol=0, atol=0)
        assert not teacher_out.requires_grad
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.step()
    assert list(ema.module.parameters()) == []
    assert model.training  # the model's own mode is left alone


def test_module_in_train_mode_does_not_corrupt_the_average():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.8)
    _train(model, ema, 3)
    before = {n: t.clone() for n, t in tensors_of(ema).items()}
    ema.module.train()
    ema.module(torch.randn(16, 6))
    for n, t in tensors_of(ema).items():
        assert torch.equal(t, before[n]), n


def test_module_before_start_uses_the_model():
    model = Net().eval()
    ema = emakit.EMA(model, start="10ba")
    x = torch.randn(3, 6)
    torch.testing.assert_close(ema.module(x), model(x), rtol=0, atol=0)


def test_construction_does_not_deepcopy_the_model():
    class Refuses(Net):
        def __deepcopy__(self, memo):
            raise RuntimeError("this model cannot be deep-copied")

    model = Refuses()
    ema = emakit.EMA(model, smoothing=0.5)
    _train(model, ema, 2)
    assert ema.module(torch.randn(2, 6)).shape == (2, 8)


def test_compute_ema_functional():
    model, ema_model = Net(), Net()
    ema_model.load_state_dict(model.state_dict())
    init = flat_params(model)
    gen = torch.Generator().manual_seed(2)
    set_random_weights(model, gen)
    theta = flat_params(model)
    emakit.compute_ema(model, ema_model, smoothing=0.75)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    got = torch.cat([ema_model.state_dict()[n].double().reshape(-1) for n in trainable])
    ref_all = closed_form(init, [(0.75, theta)])
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    parts = dict(zip(names, ref_all.split(sizes), strict=True))
    torch.testing.assert_close(got, torch.cat([parts[n] for n in trainable]))
    with pytest.raises(ValueError, match="missing names"):
        emakit.compute_ema(model, nn.Linear(6, 8))
    with pytest.raises(ValueError, match="smoothing"):
        emakit.compute_ema(model, ema_model, smoothing=1.5)


def test_flat_state_helper_consistency():
    model = Net()
    ema = emakit.EMA(model, smoothing=0.0)
    _train(model, ema, 2)
    # smoothing 0: the average is the model
    torch.testing.assert_close(flat_state(ema.ema_state_dict(), model), flat_params(model))
