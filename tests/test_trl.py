"""EMACallback in TRL's SFTTrainer (CPU): a tiny Llama and a word-level tokenizer, both built
here from configs, so nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no downloads

import pytest  # noqa: E402

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer  # noqa: E402

import emakit  # noqa: E402
from emakit.integrations.transformers import EMACallback, EMATrainerMixin  # noqa: E402

WORDS = "the cat dog sat ran on a mat log fast slow".split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def texts(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (5,), generator=g).tolist()
        rows.append(" ".join(WORDS[i] for i in idx))
    return Dataset.from_dict({"text": rows})


class Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters()})


class EMASFTTrainer(EMATrainerMixin, SFTTrainer):
    pass


def sft_args(out, **kw):
    opts = dict(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        num_train_epochs=2, learning_rate=0.05, lr_scheduler_type="constant", report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        max_length=16, dataset_num_proc=None, bf16=False, eval_strategy="steps", eval_steps=2,
    )
    opts.update(kw)
    return SFTConfig(**opts)


@pytest.mark.parametrize("mixin", [False, True])
def test_sft_trainer_keeps_the_average_and_evaluates_on_it(tmp_path, mixin):
    tok = tokenizer()
    model = tiny_llama(len(tok))
    cb, rec = EMACallback(half_life="2ba"), Steps()
    cls = EMASFTTrainer if mixin else SFTTrainer
    trainer = cls(model=model, args=sft_args(tmp_path), train_dataset=texts(16, 1),
                  eval_dataset=texts(8, 2), processing_class=tok, callbacks=[rec, cb])
    trainer.train()
    assert trainer.state.global_step == len(rec.steps) == 8
    # the average equals a plain-loop EMA over the weights the optimizer produced
    ref_model = tiny_llama(len(tok))
    ref = emakit.EMA(ref_model, half_life="2ba")
    for snap in rec.steps:
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(snap[n])
        ref.step()
    got, want = cb.ema.ema_state_dict(), ref.ema_state_dict()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert cb.ema.num_updates == 8  # the start copy counts
    # evaluation on the average equals evaluation of a model holding the average
    training = {k: v.clone() for k, v in model.state_dict().items()}
    if mixin:
        on_average = trainer.evaluate()["eval_loss"]
    else:
        with cb.swapped():
            on_average = trainer.evaluate()["eval_loss"]
    cb.evaluate_with = "model"
    on_training = trainer.evaluate()["eval_loss"]
    cb.ema.copy_to()
    copied = trainer.evaluate()["eval_loss"]
    assert on_average == pytest.approx(copied, rel=1e-6)
    assert on_average != pytest.approx(on_training, rel=1e-4)
    model.load_state_dict(training)
