"""EMACallback in a real transformers.Trainer (CPU, tiny BERT built from a config)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no downloads

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import emakit  # noqa: E402
from emakit.integrations.transformers import EMA_MODEL_DIR, EMA_STATE_NAME, EMACallback  # noqa: E402


class Pairs(Dataset):
    """Token sequences labelled by whether token 1 occurs in them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 20, (n, 6), generator=g)
        self.ids[: n // 2, 2] = 1
        self.labels = (self.ids == 1).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=8, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return AutoModelForSequenceClassification.from_config(config)


def args(out, **kw):
    opts = dict(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=0.05,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    opts.update(kw)
    return TrainingArguments(**opts)


class Recorder(TrainerCallback):
    """Snapshots the trainable weights after each optimizer step, and the metrics and EMA
    state at each evaluation."""

    def __init__(self, ema_cb):
        self.ema_cb, self.steps, self.evals = ema_cb, [], []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.evals.append((metrics["eval_loss"], self.ema_cb.ema.ema_state_dict()))


def manual_eval_loss(model, state, ds) -> float:
    """Mean over equal-size batches of the model's loss: what Trainer.evaluate reports."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        losses = [m(**b).loss.item() for b in DataLoader(ds, batch_size=8)]
    return sum(losses) / len(losses)


TRAIN, EVAL = Pairs(32, 1), Pairs(16, 2)  # 8 micro-batches = 4 optimizer steps per epoch


def test_average_follows_optimizer_steps_and_evaluation_uses_it(tmp_path):
    model = tiny_model()
    cb = EMACallback(half_life="2ba", start="1ba")
    rec = Recorder(cb)
    trainer = Trainer(
        model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=3),
        train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[rec, cb],
    )
    trainer.train()
    assert len(rec.steps) == trainer.state.global_step == 8  # accumulation: 16 batches / 2
    # The same weights, step by step, through a plain-loop EMA.
    ref_model = copy.deepcopy(model)
    ref = emakit.EMA(ref_model, half_life="2ba", start="1ba")
    for i, snapshot in enumerate(rec.steps):
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(snapshot[n])
        ref.step()
        if (i + 1) % 4 == 0:
            ref.epoch_end()
    assert cb.ema.num_updates == ref.num_updates == 8
    assert cb.ema.clock.counts == ref.clock.counts == {"ba": 8, "ep": 2, "sp": 0, "tok": 0}
    got, want = cb.ema.ema_state_dict(), ref.ema_state_dict()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # float64 by hand for one tensor: start at step 1, then s = 2 ** -0.5
    name = "classifier.weight"
    avg = rec.steps[0][name].double()
    for snap in rec.steps[1:]:
        avg = 2**-0.5 * avg + (1 - 2**-0.5) * snap[name].double()
    torch.testing.assert_close(got[name].double(), avg, rtol=1e-6, atol=1e-7)

    # evaluations during training (steps 3, 6 and the last, 8) ran on the average
    assert len(rec.evals) == 3
    for loss, averaged in rec.evals:
        assert loss == pytest.approx(manual_eval_loss(model, averaged, EVAL), rel=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = trainer.evaluate()["eval_loss"]
    assert loss == pytest.approx(manual_eval_loss(model, got, EVAL), rel=1e-5)
    assert loss != pytest.approx(manual_eval_loss(model, before, EVAL), rel=1e-4)
    predicted = trainer.predict(EVAL).metrics["test_loss"]
    assert predicted == pytest.approx(loss, rel=1e-6)
    for k, v in model.state_dict().items():  # training weights back, bitwise
        assert torch.equal(v, before[k]), k
    cb.evaluate_with = "model"
    loss = trainer.evaluate()["eval_loss"]
    assert loss == pytest.approx(manual_eval_loss(model, before, EVAL), rel=1e-5)


def test_checkpoints_hold_the_ema_and_resume_exactly(tmp_path):
    kw = dict(half_life="3ba", start="2ba")
    ckpt_args = dict(save_strategy="steps", save_steps=4)
    straight_cb = EMACallback(**kw)
    straight = tiny_model()
    Trainer(model=straight, args=args(tmp_path / "a", **ckpt_args), train_dataset=TRAIN,
            callbacks=[straight_cb]).train()
    half = tmp_path / "a" / "checkpoint-4"  # end of epoch 1 of 2
    saved = torch.load(half / EMA_STATE_NAME, weights_only=True)
    assert saved["global_step"] == 4 and saved["ema"]["num_updates"] == 3
    loaded = AutoModelForSequenceClassification.from_pretrained(half / EMA_MODEL_DIR)
    for n, t in loaded.state_dict().items():
        if n in saved["ema"]["average"]:
            assert torch.equal(t, saved["ema"]["average"][n]), n
    base = AutoModel.from_pretrained(half / EMA_MODEL_DIR)  # the spelling: the encoder
    assert torch.equal(base.embeddings.word_embeddings.weight,
                       saved["ema"]["average"]["bert.embeddings.word_embeddings.weight"])
    # and it is not just the training weights of that checkpoint
    training = AutoModelForSequenceClassification.from_pretrained(half)
    assert not torch.equal(training.classifier.weight, loaded.classifier.weight)

    resumed_cb = EMACallback(**kw)
    resumed = tiny_model()
    trainer = Trainer(model=resumed, args=args(tmp_path / "b", **ckpt_args),
                      train_dataset=TRAIN, callbacks=[resumed_cb])
    trainer.train(resume_from_checkpoint=str(half))
    assert resumed_cb.ema.num_updates == straight_cb.ema.num_updates == 7
    a, b = straight_cb.ema.state_dict(), resumed_cb.ema.state_dict()
    assert a["clock"] == b["clock"]
    for n in a["average"]:
        assert torch.equal(a["average"][n], b["average"][n]), n


def test_resume_without_ema_state_warns_and_bad_arguments(tmp_path):
    Trainer(model=tiny_model(), args=args(tmp_path, save_strategy="steps", save_steps=4,
                                          max_steps=4), train_dataset=TRAIN).train()
    cb = EMACallback(half_life="0.2dur")  # total from max_steps: 5 steps, half-life 1 step
    trainer = Trainer(model=tiny_model(), args=args(tmp_path, max_steps=5),
                      train_dataset=TRAIN, callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="EMA restarts"):
        trainer.train(resume_from_checkpoint=True)
    assert str(cb.ema.total) == "5ba" and cb.ema.smoothing == 0.5
    assert cb.ema.clock.counts["ba"] == 1  # the one step after the checkpoint at 4
    with pytest.raises(ValueError, match="evaluate_with"):
        EMACallback(evaluate_with="both")
    with pytest.raises(ValueError, match="smoothing"):
        EMACallback(smoothing=1.5)
