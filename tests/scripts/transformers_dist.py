"""One rank of the Transformers Trainer under FSDP or DeepSpeed ZeRO-3 (CPU, gloo), with the
EMA callback; run by tests/test_transformers_dist.py through tests/multiproc.py:

    python transformers_dist.py SCENARIO OUT_DIR   (RANK, WORLD_SIZE, MASTER_* set)

Scenarios: ``fsdp`` (FSDP2, the Trainer's ``fsdp="full_shard"``, then FSDP1, in the same
processes) and ``zero3`` (a ZeRO-3 ``deepspeed`` config). Each trains 8 optimizer steps with an
evaluation and a checkpoint every 4, then trains again from ``checkpoint-4`` with a fresh
Trainer, model and callback. After every step a recorder reads the full training weights with
torch's ``get_model_state_dict`` (FSDP) or DeepSpeed's ``GatheredParameters`` (not through
emakit), so the test can replay a float64 EMA of them. Rank 0 writes ``OUT_DIR/<name>.pt``.

What the CPU needs, and why (see docs/distributed.md):

- Accelerate uses its FSDP plugin only on accelerators: on the CPU (``MULTI_CPU``) it ignores
  it and the Trainer trains under DDP. :func:`force_fsdp` makes the accelerator state the
  Trainer finds say FSDP, with the plugin the Trainer builds from its arguments, so that
  Accelerate's own ``prepare`` shards the model as on GPUs.
- FSDP1 through Accelerate fails in torch on the CPU (Accelerate passes ``device_id`` =
  ``cpu:0``, FSDP computes on ``cpu``: "Inconsistent compute device"), so the FSDP1 run hands
  the Trainer a model wrapped beforehand (Accelerate's manual-wrapping path), with
  ``SHARDED_STATE_DICT`` checkpoints: FSDP1's full state dict with ``offload_to_cpu`` crashes
  on the CPU in torch 2.13.
- ZeRO-3: the Trainer's CPU path does not start DeepSpeed's communication before the model
  is built under ``deepspeed.zero.Init``, which then counts one process;
  ``deepspeed.init_distributed()`` first.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the model and data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from emakit.integrations.transformers import EMACallback, EMATrainer  # noqa: E402

KW = dict(half_life="3ba", start="2ba")
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto", "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}


def training_args(out: Path, name: str) -> TrainingArguments:
    how: dict = {}
    if name == "fsdp2":
        how = dict(fsdp="full_shard", fsdp_config={
            "version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
    elif name == "fsdp1":
        how = dict(fsdp="full_shard", fsdp_config={
            "version": 1, "sync_module_states": False,
            "state_dict_type": "SHARDED_STATE_DICT"},
            # the FSDP wrapper hides the model's signature (its inputs and labels)
            remove_unused_columns=False, label_names=["labels"])
    elif name == "zero3":
        how = dict(deepspeed=ZERO3)
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        num_train_epochs=2, learning_rate=0.05, lr_scheduler_type="constant", report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=4, eval_strategy="steps",
        eval_steps=4, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=0,
        # with it (the default) Transformers 5.25 reports world_size x the loss in
        # distributed evaluations (also under plain DDP); the test compares with the loss
        average_tokens_across_devices=False, **how)


def force_fsdp(args: TrainingArguments) -> None:
    """The accelerator state the Trainer will find: FSDP with the Trainer's plugin (see the
    module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    AcceleratorState._reset_state()  # keeps the process group
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    Accelerator(cpu=True, fsdp_plugin=plugin)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def make_model(name: str) -> nn.Module:
    from test_transformers import tiny_model

    model = tiny_model()
    if name == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.bert.modeling_bert import BertLayer

        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                         use_orig_params=True,
                                         auto_wrap_policy=ModuleWrapPolicy({BertLayer}))
    return model


def full_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The full training weights, gathered by torch or DeepSpeed (every rank calls)."""
    if name == "zero3":
        import deepspeed

        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


class Recorder(TrainerCallback):
    def __init__(self, name: str) -> None:
        self.name, self.weights, self.evals = name, [], []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.weights.append(full_weights(model, self.name))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.evals.append((state.global_step, dict(metrics)))  # raw, then the average


def run(out: Path, name: str) -> None:
    from test_transformers import Pairs

    train, evals = Pairs(32, 1), Pairs(16, 2)

    def trainer(folder: str, cb: EMACallback, rec: Recorder) -> EMATrainer:
        args = training_args(out / folder, name)
        if name.startswith("fsdp"):
            force_fsdp(args)
        return EMATrainer(model=make_model(name), args=args, train_dataset=train,
                          eval_dataset=evals, callbacks=[rec, cb])

    cb, rec = EMACallback(**KW, evaluate_with="both"), Recorder(name)
    t = trainer(name, cb, rec)
    assert t.is_fsdp_enabled == name.startswith("fsdp")
    assert t.is_deepspeed_enabled == (name == "zero3")
    t.train()
    result = {"weights": rec.weights, "evals": rec.evals, "counts": cb.ema.counts,
              "average": cb.ema.ema_state_dict(rank0_only=True),
              "wrapper": type(cb.ema.model).__name__}
    cb2, rec2 = EMACallback(**KW, evaluate_with="both"), Recorder(name)
    trainer(f"{name}-resumed", cb2, rec2).train(
        resume_from_checkpoint=str(out / name / "checkpoint-4"))
    result["resumed_average"] = cb2.ema.ema_state_dict(rank0_only=True)
    result["resumed_counts"] = cb2.ema.counts
    result["resumed_weights"] = rec2.weights
    if torch.distributed.get_rank() == 0:
        torch.save(result, out / f"{name}.pt")


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], Path(sys.argv[2])
    if scenario == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        run(out, "zero3")
    else:
        TrainingArguments(output_dir=str(out), use_cpu=True)  # starts the process group
        for name in ("fsdp2", "fsdp1"):
            run(out, name)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
