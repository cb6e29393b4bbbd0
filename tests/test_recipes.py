"""Recipes of docs/recipes.md that have a peer: TRL's reference-model sync (``sync_ref_model``,
TR-DPO) is an EMA, checked here against TRL's own ``SyncRefModelCallback`` step by step."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import emakit  # noqa: E402


def _policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


@pytest.mark.parametrize("alpha,tau", [(0.6, 1), (0.3, 4)])
def test_trl_sync_ref_model_is_an_ema(tmp_path, alpha, tau):
    pytest.importorskip("trl")
    from accelerate import Accelerator
    from transformers import TrainerControl, TrainerState
    from trl import DPOConfig
    from trl.trainer.callbacks import SyncRefModelCallback

    policy = _policy()
    ref = copy.deepcopy(policy)  # what the trainer's reference model starts as
    args = DPOConfig(str(tmp_path), sync_ref_model=True, ref_model_mixup_alpha=alpha,
                     ref_model_sync_steps=tau, use_cpu=True, report_to=[])
    # as the trainers build it (the sync reads the accelerator's DeepSpeed state)
    peer = SyncRefModelCallback(ref_model=ref, accelerator=Accelerator(cpu=True))
    state = TrainerState()

    ema = emakit.EMA(policy, smoothing=1 - alpha, update_interval=f"{tau}ba",
                     dtype=torch.float64, copy_at_construction=True)  # a copy of the policy
    opt = torch.optim.SGD(policy.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(5, 4, generator=g, dtype=torch.float64)
    moved = 0.0
    for step in range(1, 21):
        opt.zero_grad()
        x = torch.randn(16, 4, generator=g, dtype=torch.float64)
        policy(x).square().mean().backward()
        opt.step()
        state.global_step = step
        peer.on_step_end(args, state, TrainerControl(), model=policy)
        ema.step()
        ours = ema.ema_state_dict()
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(ours[name], t, rtol=1e-12, atol=1e-13,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")
        torch.testing.assert_close(ema.module(probe), ref(probe), rtol=1e-12, atol=1e-13)
        moved = max(moved, float((ours["0.weight"] - policy[0].weight).abs().max()))
    assert moved > 1e-2  # the reference is not the policy
