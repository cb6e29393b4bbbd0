"""EMACallback in a real transformers.Trainer (CPU, tiny BERT built from a config)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no downloads

import copy  # noqa: E402
import inspect  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402

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
from emakit.checkpoint import read_state  # noqa: E402
from emakit.integrations.transformers import (  # noqa: E402
    EMA_MODEL_DIR,
    EMA_STATE_NAME,
    LEGACY_EMA_STATE_NAME,
    EMACallback,
    EMATrainer,
)


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
        loss = next(v for k, v in metrics.items() if k.endswith("_loss"))
        self.evals.append((loss, self.ema_cb.ema.ema_state_dict()))


def manual_eval_loss(model, state, ds) -> float:
    """Mean over equal-size batches of the model's loss: what Trainer.evaluate reports."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        losses = [m(**b).loss.item() for b in DataLoader(ds, batch_size=8)]
    return sum(losses) / len(losses)


TRAIN, EVAL = Pairs(32, 1), Pairs(16, 2)  # 8 micro-batches = 4 optimizer steps per epoch


def replay(steps, **kw):
    """The same weights, step by step, through a plain-loop EMA (4 optimizer steps per epoch)."""
    ref_model = tiny_model()
    ref = emakit.EMA(ref_model, **kw)
    for i, snapshot in enumerate(steps):
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(snapshot[n])
        ref.step()
        if (i + 1) % 4 == 0:
            ref.epoch_end()
    return ref


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_average_follows_optimizer_steps_and_evaluations_in_training_use_it(tmp_path):
    """Plain Trainer, callback only: public hooks put the average in for the evaluations the
    Trainer runs during training."""
    model = tiny_model()
    cb = EMACallback(half_life=2, start=1)  # ints: that many optimizer steps
    rec = Recorder(cb)
    trainer = Trainer(
        model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=3),
        train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[rec, cb],
    )
    trainer.train()
    assert len(rec.steps) == trainer.state.global_step == 8  # accumulation: 16 batches / 2
    ref = replay(rec.steps, half_life="2ba", start="1ba")
    assert cb.ema.num_updates == ref.num_updates == 8  # the start copy counts
    assert cb.ema.counts == ref.counts == {"ba": 8, "ep": 2, "sp": 0, "tok": 0}
    got = cb.ema.ema_state_dict()
    assert_state_equal(got, ref.ema_state_dict())
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
    # the training weights are back after training, bitwise equal to the last step's
    for n, p in model.named_parameters():
        assert torch.equal(p, rec.steps[-1][n]), n

    # a trainer.evaluate() of the user's: the callback is not told it begins, so it says so
    with pytest.warns(RuntimeWarning, match="ran on the training weights"):
        loss = trainer.evaluate()["eval_loss"]
    assert loss == pytest.approx(manual_eval_loss(model, before, EVAL), rel=1e-5)
    with cb.swapped():
        loss = trainer.evaluate()["eval_loss"]
        predicted = trainer.predict(EVAL).metrics["test_loss"]
    assert loss == pytest.approx(manual_eval_loss(model, got, EVAL), rel=1e-5)
    assert loss != pytest.approx(manual_eval_loss(model, before, EVAL), rel=1e-4)
    assert predicted == pytest.approx(loss, rel=1e-6)
    for k, v in model.state_dict().items():  # training weights back, bitwise
        assert torch.equal(v, before[k]), k


def test_ema_trainer_evaluates_and_predicts_on_the_average(tmp_path):
    model = tiny_model()
    cb = EMACallback(half_life="2ba")
    rec = Recorder(cb)
    evals = {"a": EVAL, "b": Pairs(8, 3)}
    trainer = EMATrainer(
        model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=4),
        train_dataset=TRAIN, eval_dataset=evals,
    )
    trainer.add_callback(rec)
    trainer.add_callback(cb)  # after construction: works the same
    trainer.train()
    got = cb.ema.ema_state_dict()
    assert_state_equal(got, replay(rec.steps, half_life="2ba").ema_state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran on the training weights"
        metrics = trainer.evaluate()
        predicted = trainer.predict(EVAL).metrics["test_loss"]
    for key, ds in evals.items():  # both datasets on the average
        assert metrics[f"eval_{key}_loss"] == pytest.approx(
            manual_eval_loss(model, got, ds), rel=1e-5)
    assert predicted == pytest.approx(manual_eval_loss(model, got, EVAL), rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # during training too (2 evaluations x 2 datasets), then the 2 above: all on the average
    assert len(rec.evals) == 6
    for (loss, averaged), ds in zip(rec.evals, [EVAL, evals["b"]] * 3, strict=True):
        assert loss == pytest.approx(manual_eval_loss(model, averaged, ds), rel=1e-5)
    cb.evaluate_with = "model"
    metrics = trainer.evaluate()
    assert metrics["eval_a_loss"] == pytest.approx(manual_eval_loss(model, before, EVAL), rel=1e-5)


def test_several_eval_datasets_need_the_trainer_mixin(tmp_path):
    trainer = Trainer(
        model=tiny_model(), args=args(tmp_path, eval_strategy="steps", eval_steps=4),
        train_dataset=TRAIN, eval_dataset={"a": EVAL, "b": EVAL},
        callbacks=[EMACallback(half_life="2ba")],
    )
    with pytest.raises(RuntimeError, match="EMATrainer"):
        trainer.train()


KW = dict(half_life="3ba", start="2ba")
CKPT = dict(save_strategy="steps", save_steps=4)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps in one go, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("straight")
    cb = EMACallback(**KW)
    Trainer(model=tiny_model(), args=args(out, **CKPT), train_dataset=TRAIN,
            callbacks=[cb]).train()
    return out, cb


def test_checkpoints_hold_the_ema(straight_run):
    out, cb = straight_run
    half = out / "checkpoint-4"  # end of epoch 1 of 2
    assert EMA_STATE_NAME == "emakit_ema.safetensors"
    saved = read_state(half / EMA_STATE_NAME)  # emakit's safe state file: no unpickling
    assert saved["extra"]["global_step"] == 4 and saved["ema"]["num_updates"] == 3
    loaded = AutoModelForSequenceClassification.from_pretrained(half / EMA_MODEL_DIR)
    for n, t in loaded.state_dict().items():
        if n in saved["ema"]["average"]:
            assert torch.equal(t, saved["ema"]["average"][n]), n
    base = AutoModel.from_pretrained(half / EMA_MODEL_DIR)  # the encoder alone
    assert torch.equal(base.embeddings.word_embeddings.weight,
                       saved["ema"]["average"]["bert.embeddings.word_embeddings.weight"])
    # and it is not just the training weights of that checkpoint
    training = AutoModelForSequenceClassification.from_pretrained(half)
    assert not torch.equal(training.classifier.weight, loaded.classifier.weight)


@pytest.mark.parametrize(
    "how", ["constructor", "add_callback", "ema_trainer_elsewhere", "resume_from_elsewhere"])
def test_resume_is_exact_however_the_callback_was_added(straight_run, tmp_path, how):
    out, straight_cb = straight_run
    cb = EMACallback(**KW)
    if how.endswith("elsewhere"):  # a checkpoint outside output_dir: say where
        src = tmp_path / "moved" / "checkpoint-4"
        shutil.copytree(out / "checkpoint-4", src)
        cls = EMATrainer if how == "ema_trainer_elsewhere" else Trainer
        trainer = cls(model=tiny_model(), args=args(tmp_path / "run", **CKPT),
                      train_dataset=TRAIN, callbacks=[cb])
        if how == "resume_from_elsewhere":
            cb.resume_from(src)  # a plain Trainer does not tell the callback
        trainer.train(resume_from_checkpoint=str(src))
    else:
        run = tmp_path / "run"
        shutil.copytree(out / "checkpoint-4", run / "checkpoint-4")
        trainer = Trainer(model=tiny_model(), args=args(run, **CKPT), train_dataset=TRAIN,
                          callbacks=[cb] if how == "constructor" else None)
        if how == "add_callback":
            trainer.add_callback(cb)
        trainer.train(resume_from_checkpoint=True)
    assert cb.ema.num_updates == straight_cb.ema.num_updates == 7  # the start copy counts
    a, b = straight_cb.ema.state_dict(), cb.ema.state_dict()
    assert a["clock"] == b["clock"]
    assert_state_equal(a["average"], b["average"])


def test_resume_elsewhere_never_loads_another_runs_average(straight_run, tmp_path):
    """A plain Trainer resumed from a folder outside output_dir, where output_dir holds a
    checkpoint-4 of another run: the callback refuses that file rather than load it."""
    out, _ = straight_run
    other = tmp_path / "run"
    Trainer(model=tiny_model(), args=args(other, max_steps=4, learning_rate=0.2, **CKPT),
            train_dataset=TRAIN, callbacks=[EMACallback(**KW)]).train()
    trainer = Trainer(model=tiny_model(), args=args(other, **CKPT), train_dataset=TRAIN,
                      callbacks=[EMACallback(**KW)])
    with pytest.raises(ValueError, match="another run"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_resume_without_ema_state_warns_and_keeps_the_clock(tmp_path):
    Trainer(model=tiny_model(), args=args(tmp_path, save_strategy="steps", save_steps=4,
                                          max_steps=4), train_dataset=TRAIN).train()
    cb = EMACallback(half_life="0.2dur", start="5ba")  # total from max_steps: 6 steps
    trainer = Trainer(model=tiny_model(), args=args(tmp_path, max_steps=6),
                      train_dataset=TRAIN, callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="EMA restarts"):
        trainer.train(resume_from_checkpoint=True)
    assert str(cb.ema.total) == "6ba" and cb.ema.smoothing == pytest.approx(2 ** (-1 / 1.2))
    assert cb.ema.counts["ba"] == 6  # the clock at the trainer's step: 4, then 5, 6
    assert cb.ema.started and cb.ema.num_updates == 2  # copy at step 5, one update at 6


@pytest.mark.parametrize("evaluate_with", ["ema", "model"])
def test_load_best_model_at_end_loads_the_measured_weights(tmp_path, evaluate_with):
    model = tiny_model()
    cb = EMACallback(half_life="4ba", evaluate_with=evaluate_with)
    rec = Recorder(cb)
    trainer = EMATrainer(
        model=model,
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                  save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                  learning_rate=0.2),
        train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[rec, cb],
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    step = int(best.rsplit("-", 1)[1])
    saved = read_state(os.path.join(best, EMA_STATE_NAME))
    if evaluate_with == "ema":
        want = {**model.state_dict(), **saved["ema"]["average"]}
        losses = [loss for loss, _ in rec.evals]
        assert min(losses) == pytest.approx(manual_eval_loss(model, want, EVAL), rel=1e-5)
        assert cb.ema.state_dict()["clock"]["ba"] == step  # the EMA as of that checkpoint
    else:
        want = rec.steps[step - 1]
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n].to(p.dtype)), n


def test_every_ema_argument_reaches_the_callback():
    ema_args = set(inspect.signature(emakit.EMA).parameters) - {"model"}
    ours = inspect.signature(EMACallback).parameters
    assert ema_args <= set(ours), ema_args - set(ours)
    config = emakit.EMAConfig(half_life="4ba", exclude="classifier.*")
    assert EMACallback(config=config).config is config
    with pytest.raises(TypeError, match="not both"):
        EMACallback(config=config, start="2ba")
    with pytest.raises(ValueError, match="not samples"):
        EMACallback(start="100sp")


def test_token_times_count_the_trainers_tokens(tmp_path):
    """6 tokens a sample, 4 samples a micro-batch, 2 micro-batches a step: 48 tokens a step,
    so start="150tok" is step 4."""
    cb = EMACallback(half_life="2ba", start="150tok")
    rec = Recorder(cb)
    trainer = Trainer(model=tiny_model(), args=args(tmp_path, include_num_input_tokens_seen=True),
                      train_dataset=TRAIN, callbacks=[rec, cb])
    trainer.train()
    assert cb.ema.counts["tok"] == trainer.state.num_input_tokens_seen == 16 * 4 * 6
    assert_state_equal(cb.ema.ema_state_dict(),
                       replay(rec.steps, half_life="2ba", start="4ba").ema_state_dict())
    assert cb.ema.num_updates == 8 - 4 + 1
    trainer = Trainer(model=tiny_model(), args=args(tmp_path), train_dataset=TRAIN,
                      callbacks=[EMACallback(start="150tok")])
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        trainer.train()


def test_bad_arguments():
    with pytest.raises(ValueError, match="evaluate_with"):
        EMACallback(evaluate_with="average")
    with pytest.raises(ValueError, match="smoothing"):
        EMACallback(smoothing=1.5)
    for name in ("save_ema_model", "log_stats"):  # strict booleans
        with pytest.raises(TypeError, match=f"{name}: expected True or False, got str 'no'"):
            EMACallback(**{name: "no"})


def test_no_frame_inspection_or_replaced_methods():
    import emakit.integrations.transformers as adapter

    source = inspect.getsource(adapter)
    assert "_getframe" not in source and "setattr(trainer" not in source


def test_evaluate_with_both_reports_the_average_and_the_training_weights(tmp_path):
    """evaluate_with="both": eval_loss is the average's, eval_raw_loss the training
    weights', at every evaluation during training and in evaluate(); several eval datasets
    too; a plain Trainer cannot run the second evaluation and says so."""
    model = tiny_model()
    cb = EMACallback(half_life="2ba", evaluate_with="both")
    rec = Recorder(cb)
    trainer = EMATrainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=4),
                         train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[rec, cb])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h or "eval_raw_loss" in h]
    assert [sorted(k for k in h if k in ("eval_loss", "eval_raw_loss")) for h in evals] == \
        [["eval_raw_loss"], ["eval_loss"]] * 2  # steps 4 and 8: raw first, then the average
    for raw, avg, step in zip(evals[::2], evals[1::2], (4, 8), strict=True):
        assert raw["step"] == avg["step"] == step
        assert raw["eval_raw_loss"] == pytest.approx(
            manual_eval_loss(model, rec.steps[step - 1], EVAL), rel=1e-5)
    # the average's loss at step 8 (the Recorder saw the average at each evaluation)
    averaged = rec.evals[-1][1]
    assert evals[-1]["eval_loss"] == pytest.approx(manual_eval_loss(model, averaged, EVAL),
                                                   rel=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = trainer.evaluate({"a": EVAL, "b": Pairs(8, 3)})
    for key, ds in (("a", EVAL), ("b", Pairs(8, 3))):
        assert metrics[f"eval_{key}_loss"] == pytest.approx(
            manual_eval_loss(model, averaged, ds), rel=1e-5)
        assert metrics[f"eval_raw_{key}_loss"] == pytest.approx(
            manual_eval_loss(model, before, ds), rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    plain = Trainer(model=tiny_model(), args=args(tmp_path / "plain"), train_dataset=TRAIN,
                    callbacks=[EMACallback(evaluate_with="both")])
    with pytest.raises(ValueError, match="evaluate_with='both'.*EMATrainer"):
        plain.train()


class Reporter(TrainerCallback):
    """Stands in for a reporting integration (W&B, TensorBoard): registered before the EMA
    callback, it sees the logs as they are when on_log runs for it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        if "loss" in logs:
            self.logs.append(dict(logs))


@pytest.mark.parametrize("cls", [Trainer, EMATrainer])
def test_statistics_in_the_training_logs(tmp_path, cls):
    """ema_smoothing, ema_num_updates, ema_skipped_updates beside each training loss; with
    EMATrainer before any callback sees the logs, with a plain Trainer in log_history."""
    cb, reporter = EMACallback(half_life="2ba", start="3ba"), Reporter()
    trainer = cls(model=tiny_model(), args=args(tmp_path, logging_strategy="steps",
                                                logging_steps=2, num_train_epochs=1),
                  train_dataset=TRAIN, callbacks=[reporter, cb])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [(h["step"], h["ema_num_updates"], h["ema_skipped_updates"]) for h in logged] == \
        [(2, 0, 0), (4, 2, 0)]  # copy at step 3, one update at 4
    assert all(h["ema_smoothing"] == pytest.approx(2 ** -0.5) for h in logged)
    seen = [r.get("ema_num_updates") for r in reporter.logs]
    assert seen == ([0, 2] if cls is EMATrainer else [None, None])
    quiet = EMACallback(log_stats=False)
    trainer = cls(model=tiny_model(), args=args(tmp_path / "q", logging_strategy="steps",
                                                logging_steps=2, max_steps=2),
                  train_dataset=TRAIN, callbacks=[quiet])
    trainer.train()
    assert not any("ema_num_updates" in h for h in trainer.state.log_history)


def test_ema_folder_gets_the_tokenizer_and_old_state_files_still_load(straight_run, tmp_path):
    """The ema/ folder holds the Trainer's tokenizer (from_pretrained loads both); an
    emakit_ema.pt written by emakit 0.1 (torch.save) resumes as exactly as the new file."""
    from transformers import AutoTokenizer, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    out = tmp_path / "tok"
    Trainer(model=tiny_model(), args=args(out, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=TRAIN, processing_class=tokenizer,
            callbacks=[EMACallback(half_life="2ba")]).train()
    loaded = AutoTokenizer.from_pretrained(out / "checkpoint-2" / EMA_MODEL_DIR)
    assert loaded("a b")["input_ids"] == tokenizer("a b")["input_ids"] == [2, 5, 6, 3]
    AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-2" / EMA_MODEL_DIR)

    # the 0.1 format, written by hand: what EMACallback wrote with torch.save
    old_out, straight_cb = straight_run
    run = tmp_path / "run"
    shutil.copytree(old_out / "checkpoint-4", run / "checkpoint-4")
    saved = read_state(run / "checkpoint-4" / EMA_STATE_NAME)
    (run / "checkpoint-4" / EMA_STATE_NAME).unlink()
    torch.save({"ema": saved["ema"], **saved["extra"]},
               run / "checkpoint-4" / LEGACY_EMA_STATE_NAME)
    cb = EMACallback(**KW)
    Trainer(model=tiny_model(), args=args(run, **CKPT), train_dataset=TRAIN,
            callbacks=[cb]).train(resume_from_checkpoint=True)
    a, b = straight_cb.ema.state_dict(), cb.ema.state_dict()
    assert a["clock"] == b["clock"]
    assert_state_equal(a["average"], b["average"])
    assert (run / "checkpoint-8" / EMA_STATE_NAME).is_file()  # new saves: the safe file


def test_evaluate_after_load_best_model_at_end_needs_no_swap(tmp_path):
    """After load_best_model_at_end the model holds the best checkpoint's average, so a
    plain Trainer's evaluate() measures it and does not warn."""
    model = tiny_model()
    cb = EMACallback(half_life="4ba")
    rec = Recorder(cb)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                  save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                  learning_rate=0.2),
        train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[rec, cb],
    )
    trainer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = trainer.evaluate()["eval_loss"]
    assert loss == pytest.approx(min(loss for loss, _ in rec.evals[:-1]), rel=1e-6)


def test_posthoc_config_in_the_trainer(tmp_path):
    """config=PostHocEMAConfig: a PostHocEMA evaluated on its first profile, its profiles
    those of a plain-loop PostHocEMA of the same weights, resumed bitwise, and the sweep
    after training from its snapshots."""
    def config(folder):
        return emakit.PostHocEMAConfig(sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                                       snapshot_dir=tmp_path / folder, snapshot_dtype=None)

    model = tiny_model()
    cb = EMACallback(config=config("snaps"))
    rec = Recorder(cb)
    out = tmp_path / "out"
    trainer = EMATrainer(model=model, args=args(out, eval_strategy="steps", eval_steps=8,
                                                **CKPT),
                         train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[rec, cb])
    trainer.train()
    assert isinstance(cb.ema, emakit.PostHocEMA) and len(cb.ema.snapshots) == 4
    loss, averaged = rec.evals[-1]
    assert loss == pytest.approx(manual_eval_loss(model, averaged, EVAL), rel=1e-5)
    ref_model = tiny_model()
    ref = emakit.PostHocEMA(ref_model, config=config("plain"))
    for i, snapshot in enumerate(rec.steps):
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(snapshot[n])
        ref.step()
        if (i + 1) % 4 == 0:
            ref.epoch_end()
    for sigma in (0.05, 0.10):
        assert_state_equal(cb.ema.ema_state_dict(sigma), ref.ema_state_dict(sigma))
    for sigma in (0.06, 0.09):  # the sweep
        got, want = (emakit.synthesize(tmp_path / d, sigma) for d in ("snaps", "plain"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    resumed = EMACallback(config=config("snaps-resumed"))
    EMATrainer(model=tiny_model(), args=args(tmp_path / "run", **CKPT), train_dataset=TRAIN,
               callbacks=[resumed]).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    a, b = cb.ema.state_dict(), resumed.ema.state_dict()
    assert a["clock"] == b["clock"] and a["t"] == b["t"]
    for x, y in zip(a["averages"], b["averages"], strict=True):
        assert_state_equal(x, y)
