"""PyTorch's first FSDP (``FullyShardedDataParallel``, FlatParameter), as real gloo runs.

Two launches of ``tests/fsdp1_worker.py``: ``train`` (2 processes) runs every configuration
of ``CONFIGS`` (``use_orig_params`` True and False, nested units and one unit, tied weights,
``FULL_SHARD`` and ``SHARD_GRAD_OP``, bf16 mixed precision), the memory measurement, the
refusals and a PostHocEMA; ``load`` (1 process) loads the 2-process checkpoints into FSDP1
models on one rank. The reference is the float64 EMA, computed here, of the full weights the
worker read after every step through FSDP's own full state dict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp1_worker import (
    CONFIGS,
    HALF_LIFE,
    STEPS,
    averaged_names,
    eval_input,
    make_net,
    posthoc_one_process,
)
from multiproc import assert_close, expected_outputs, launch, replay

import emakit
from emakit import distributed as edist

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

WORKER = Path(__file__).with_name("fsdp1_worker.py")
# CPU ranks over gloo also on a GPU machine (FSDP would otherwise pick the CUDA device)
ENV = {"CUDA_VISIBLE_DEVICES": ""}


def _canonical(config: str) -> list[str]:
    """Averaged names in state-dict order, a tied tensor under its first name only."""
    seen: set[int] = set()
    out = []
    averaged = averaged_names(config)
    for name, t in make_net(config).state_dict(keep_vars=True).items():
        if id(t) not in seen and name in averaged:
            out.append(name)
        seen.add(id(t))
    return out


def _check_config(config: str, result: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every check of one configuration's run; returns the float64 reference average."""
    weights = result["weights"]
    want = replay(weights, averaged_names(config))
    assert result["placement"] == "FlatShard" and result["group"], config
    assert not result["replanned"], f"{config}: training made the store re-plan"

    # the gathered export: the one-process float64 EMA, under the names (and in the order)
    # of FSDP's own full state dict, which are the unwrapped model's names, in the model's
    # dtypes (fp32: also under bf16 mixed precision)
    assert_close(result["average"], want)
    assert list(result["average"]) == list(weights[-1]), config
    assert sorted(result["average"]) == sorted(make_net(config).state_dict()), config
    assert set(result["export_dtypes"].values()) == {torch.float32}, result["export_dtypes"]
    assert result["state_names"] == _canonical(config), config
    # an EMA built and started inside a forward pass (flat parameters unsharded, bf16 under
    # mixed precision) holds the sharded fp32 weights of that moment, exactly
    assert_close(result["inside_forward"], result["inside_forward_want"], tol=0.0)

    # outputs: swapped(), ema.module and a teacher between a forward and its backward
    # compute with the average; the training weights are back after each
    want_avg, want_train = expected_outputs(want, weights[-1], lambda: make_net(config),
                                            eval_input)
    tol = 3e-2 if CONFIGS[config].get("mixed") else 1e-5  # bf16 compute
    for key, ref in (("swapped_out", want_avg), ("module_out", want_avg),
                     ("teacher_out", want_avg), ("train_out", want_train)):
        err = (result[key] - ref).abs().max().item()
        assert err <= tol, f"{config}: {key} off by {err}"
    assert torch.equal(result["module_out"], result["swapped_out"]), config
    assert torch.equal(result["teacher_out"], result["module_out"]), config
    assert torch.equal(result["train_out_after"], result["train_out"]), config
    if CONFIGS[config]["strategy"] != "NO_SHARD":  # inside summon_full_params: refused
        assert "summon_full_params" in result["summon_error"], config

    # copy_to(): the model holds the average (in its dtype); frozen tensors are unchanged
    copied = result["copied"]
    for name, value in copied.items():
        ref = result["average"][name].float() if name in want else weights[-1][name]
        assert torch.equal(value, ref), f"{config}: copy_to gave {name} another value"

    # the 2-process checkpoint, loaded in one process into the unsharded model
    ema = emakit.EMA(make_net(config), half_life=HALF_LIFE)
    edist.load(ema, tmp_path / f"{config}-ckpt")
    assert ema.started and ema.num_updates == STEPS
    assert_close(ema.ema_state_dict(), want)
    return want


def test_fsdp1(tmp_path: Path) -> None:
    result = launch(WORKER, "train", tmp_path, 2, env=ENV)
    loaded = launch(WORKER, "load", tmp_path, 1, env=ENV)
    for config in CONFIGS:
        want = _check_config(config, result[config], tmp_path)
        # the same checkpoint loaded into the FSDP1 model on one rank (FSDP keeps the flat
        # parameters whole there: NO_SHARD)
        one = loaded[config]
        assert one["num_updates"] == STEPS and one["strategy"] == "NO_SHARD", one
        assert_close(one["average"], want)

    # memory: each rank keeps its half of the fp32 average (4 bytes per element), twice
    # that with the compensation (compensated=True, the default); alignment adds 16
    # elements per flat parameter at most
    mem = result["memory"]
    half = mem["numel"] / 2 * 4
    for per_rank, factor in ((mem["nbytes_plain"], 1), (mem["nbytes"], 2)):
        for nbytes in per_rank:
            assert factor * half * 0.999 <= nbytes <= factor * half * 1.001, (per_rank, half)

    # refusals, raised on every rank, naming the parameter and the setting
    errors = result["errors"]
    assert "sharding_strategy=HYBRID_SHARD" in errors["hybrid"]
    assert "'scale'" in errors["hybrid"]
    assert "CPUOffload(offload_params=True)" in errors["offload"]
    assert "'scale'" in errors["offload"]
    for key in ("inner", "inner_orig"):  # the module inside the root FSDP unit
        assert "scale" in errors[key] and "FullyShardedDataParallel module itself" in \
            errors[key], errors[key]
    assert "shard=True" in errors["shard"]
    assert errors["unwrapped_is_fsdp"] is True

    # PostHocEMA: rank 0 wrote snapshots of the gathered profiles (the frozen bias gathered
    # too); synthesis on them equals synthesis on a one-process run
    posthoc_one_process(str(tmp_path / "phema-one"))
    got_files = sorted((tmp_path / "phema-fsdp1").glob("phema-*.safetensors"))
    want_files = sorted((tmp_path / "phema-one").glob("phema-*.safetensors"))
    assert len(got_files) == STEPS // 2
    assert [p.name[:16] for p in got_files] == [p.name[:16] for p in want_files]
    for sigma in (0.05, 0.08, 0.10):
        got = emakit.synthesize(tmp_path / "phema-fsdp1", sigma_rel=sigma)
        ref = emakit.synthesize(tmp_path / "phema-one", sigma_rel=sigma)
        assert_close(got, ref)
