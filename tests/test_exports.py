"""Exports in one call: ``ema.save_pretrained(folder)`` on EMA, BEMA and PostHocEMA through
the model's own ``save_pretrained`` (Transformers, diffusers, PEFT), and ``emakit synthesize
--pretrained`` writing a ``from_pretrained`` folder. Each folder is loaded back with the
library's own ``from_pretrained`` and compared with the average, bitwise; the training
weights must be untouched, bitwise."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import emakit  # noqa: E402
from emakit.cli import main  # noqa: E402


def bert(cls=transformers.BertModel):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=24, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=8,
                                     max_position_embeddings=8)
    return cls(config)


def train(model, average, steps: int = 6) -> None:
    """Steps that move every trainable weight (a deterministic nudge), the average after each."""
    for i in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)),
                           alpha=0.05)
        average.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_equal(got: dict, want: dict, names=None) -> None:
    for k in names or want:
        assert torch.equal(got[k], want[k]), k


def test_transformers_model_and_an_existing_folder(tmp_path):
    """State-dict path (Transformers' save_pretrained takes one). Saving again into a folder
    that holds sharded weights of an earlier save replaces them: no stale shard or index is
    left for from_pretrained to read; other files are kept."""
    model = bert()
    ema = emakit.EMA(model, half_life="2ba")
    train(model, ema)
    before = snapshot(model)
    folder = tmp_path / "ema"
    ema.save_pretrained(folder, max_shard_size="2KB")  # kwargs reach save_pretrained
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    (folder / "notes.txt").write_text("mine")
    train(model, ema, steps=2)
    ema.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                        "notes.txt"]
    loaded = transformers.BertModel.from_pretrained(folder)
    assert_equal(loaded.state_dict(), ema.ema_state_dict())
    assert not torch.equal(loaded.pooler.dense.weight, model.pooler.dense.weight)
    train_now = snapshot(model)
    assert not torch.equal(train_now["pooler.dense.weight"], before["pooler.dense.weight"])
    ema.save_pretrained(tmp_path / "again")
    assert_equal(snapshot(model), train_now)  # the training weights untouched


def test_diffusers_and_peft_models(tmp_path):
    """Swap path (their save_pretrained takes no state dict): the average is swapped in for
    the save, the training weights come back bitwise."""
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    ema = emakit.EMA(unet, half_life="2ba")
    train(unet, ema)
    before = snapshot(unet)
    ema.save_pretrained(tmp_path / "unet")
    assert_equal(snapshot(unet), before)
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet")
    assert_equal(loaded.state_dict(), ema.ema_state_dict())
    assert not torch.equal(loaded.conv_in.weight, unet.conv_in.weight)

    lora = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    ema = emakit.EMA(lora, half_life="2ba")  # the adapters alone are averaged
    train(lora, ema)
    before = snapshot(lora)
    ema.save_pretrained(tmp_path / "lora")
    assert_equal(snapshot(lora), before)
    again = peft.PeftModel.from_pretrained(bert(), tmp_path / "lora")
    averaged = ema.ema_state_dict()
    adapters = [k for k in averaged if "lora_" in k]
    assert adapters and all(torch.equal(again.state_dict()[k], averaged[k]) for k in adapters)
    assert not torch.equal(again.state_dict()[adapters[0]], before[adapters[0]])


def test_bema_and_posthoc(tmp_path):
    model = bert()
    bema = emakit.BEMA(model)
    train(model, bema)
    bema.save_pretrained(tmp_path / "bema")  # the bias-corrected weights it hands out
    assert_equal(transformers.BertModel.from_pretrained(tmp_path / "bema").state_dict(),
                 bema.ema_state_dict())
    model = bert()
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=None,
                           snapshot_dir=tmp_path / "snaps")
    train(model, ph)
    ph.save_pretrained(tmp_path / "ph10", sigma_rel=0.10)
    loaded = transformers.BertModel.from_pretrained(tmp_path / "ph10").state_dict()
    assert_equal(loaded, ph.ema_state_dict(0.10))
    assert not torch.equal(loaded["pooler.dense.weight"],
                           ph.ema_state_dict(0.05)["pooler.dense.weight"])
    with pytest.raises(ValueError, match="sigma_rel: 0.2 is not tracked"):
        ph.save_pretrained(tmp_path / "x", sigma_rel=0.2)


def test_save_pretrained_refuses(tmp_path):
    ema = emakit.EMA(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model: Linear has no save_pretrained"):
        ema.save_pretrained(tmp_path / "x")
    ema = emakit.EMA(bert())
    with pytest.raises(TypeError, match="state_dict is not an argument"):
        ema.save_pretrained(tmp_path / "x", state_dict={})
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_directory: .* is a file"):
        ema.save_pretrained(tmp_path / "file")
    with pytest.raises(TypeError, match="save_directory: expected a path"):
        ema.save_pretrained(None)


def test_synthesize_writes_a_from_pretrained_folder(tmp_path, capsys):
    """``emakit synthesize DIR --sigma-rel S --pretrained MODEL_DIR --out OUT``: OUT holds
    MODEL_DIR's config and the synthesized weights under the names (and dtypes) of its
    weights file; tied weights (BertForMaskedLM's decoder) are written once, as
    save_pretrained does."""
    model = bert(transformers.BertForMaskedLM)
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=tmp_path / "snaps", snapshot_dtype=None)
    train(model, ph, steps=8)
    model.save_pretrained(tmp_path / "base")
    out = tmp_path / "ema-0.08"
    assert main(["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.08", "--pretrained",
                 str(tmp_path / "base"), "--out", str(out), "--no-progress"]) == 0
    assert "0.08" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tmp_path / "base").iterdir())
    loaded = transformers.BertForMaskedLM.from_pretrained(out)
    want = emakit.synthesize(tmp_path / "snaps", sigma_rel=0.08)
    assert_equal(loaded.state_dict(), want)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    # the folder exists: --force replaces it; another model's folder is refused
    assert main(["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.06", "--pretrained",
                 str(tmp_path / "base"), "--out", str(out), "--no-progress"]) == 2
    assert main(["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.06", "--pretrained",
                 str(tmp_path / "base"), "--out", str(out), "--no-progress", "--force"]) == 0
    assert_equal(transformers.BertForMaskedLM.from_pretrained(out).state_dict(),
                 emakit.synthesize(tmp_path / "snaps", sigma_rel=0.06))
    bert().save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.06", "--pretrained",
                 str(tmp_path / "other"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--pretrained: the snapshots' model" in capsys.readouterr().err
    assert main(["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.06", "--pretrained",
                 str(tmp_path / "snaps"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_supported_sigma_rels_takes_a_folder_and_progress_a_flag(tmp_path, capsys):
    from emakit.posthoc import list_snapshots, supported_sigma_rels

    model = torch.nn.Linear(4, 2)
    ph = emakit.PostHocEMA(model, snapshot_every="5ba", snapshot_dir=tmp_path)
    train(model, ph, steps=20)
    ranges = supported_sigma_rels(tmp_path)
    assert ranges and ranges == supported_sigma_rels(list_snapshots(tmp_path))
    assert ranges == supported_sigma_rels(str(tmp_path))
    with pytest.raises(TypeError, match="snapshots: expected a snapshot folder"):
        supported_sigma_rels(5)
    quiet = emakit.synthesize(tmp_path, 0.08, progress=False)
    assert capsys.readouterr().err == ""
    loud = emakit.synthesize(tmp_path, 0.08, progress=True)
    assert capsys.readouterr().err.splitlines() == [f"synthesize: {i}/4 snapshot files"
                                                    for i in range(1, 5)]
    assert_equal(quiet, loud)
    with pytest.raises(TypeError, match="progress: expected a callable"):
        emakit.synthesize(tmp_path, 0.08, progress="yes")
