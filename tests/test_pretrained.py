"""A pretrained base from a local diffusers pipeline folder (tiny random models built here):
`spacetime train --config` and `spacetime sample` on it, exact resume, temporal-only
training, LoRA, and every bad layout as one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from byo_models import write_pipeline  # noqa: E402
from diffusion import media  # noqa: E402
from diffusion.cli import main  # noqa: E402
from diffusion.config import ConfigError, RunConfig  # noqa: E402
from diffusion.run import build_diffusion, load_run  # noqa: E402

CAPTIONS = ["a red ball moves left", "a blue square moves up", "the red square moves down"]


def run_cli(*argv: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["--threads", "1", "-q", *argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    pipeline = write_pipeline(root / "sd")
    data = root / "data"
    data.mkdir()
    torch.manual_seed(0)
    for i, caption in enumerate(CAPTIONS):
        media.write_gif(torch.rand(3, 4, 16, 16), data / f"{i}.gif")
        (data / f"{i}.txt").write_text(caption + "\n")
    return root, pipeline, data


def _config(root, pipeline, data, **extra) -> "Path":
    config = {
        "pretrained": {"path": str(pipeline), **extra.pop("pretrained", {})},
        "diffusion": {"image_size": 16, "num_frames": 4, "channels": 3, "timesteps": 50, "null_cond_prob": 0.2},
        "trainer": {"train_num_steps": 2, "train_batch_size": 2, "gradient_accumulate_every": 1,
                    "save_and_sample_every": 1000, "num_sample_rows": 1, "step_start_ema": 0,
                    "sample_kwargs": {"sampler": "ddim", "steps": 2}, **extra.pop("trainer", {})},
        "data": {"kind": "folder", "folder": str(data)},
        "sample": {"sampler": "ddim", "steps": 2},
    }
    path = root / f"run-{len(list(root.glob('run-*.json')))}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def trained(base):
    root, pipeline, data = base
    run = root / "run"
    assert run_cli("train", "--config", str(_config(root, pipeline, data)), "--out", str(run)) == 0
    return run


def test_train_then_sample_writes_gifs(trained, tmp_path):
    saved = json.loads((trained / "config.json").read_text())
    assert "unet" not in saved and saved["pretrained"]["null_cond"] == "empty"
    out = tmp_path / "samples"
    assert run_cli("sample", "--checkpoint", str(trained), "--prompt", "a red ball", "--steps", "2",
                   "--cond-scale", "2", "--out", str(out)) == 0
    gifs = list(out.glob("*.gif"))
    assert len(gifs) == 1 and media.read_video(gifs[0]).shape[1:] == (4, 16, 16)


def test_spatial_weights_bit_identical_after_temporal_only_training(trained, base):
    _, pipeline, _ = base
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(pipeline / "unet").state_dict()
    diffusion = load_run(trained, weights="model")
    inflated = diffusion.denoise_fn.model
    after = inflated.state_dict_2d()
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)
    fresh = build_diffusion(RunConfig.from_dict(json.loads((trained / "config.json").read_text())))
    moved = [n for n, p in fresh.denoise_fn.model.named_parameters()
             if not torch.equal(p, dict(inflated.named_parameters())[n])]
    temporal = {id(p) for p in inflated.temporal_parameters()}
    named = dict(inflated.named_parameters())
    assert moved and all(id(named[n]) in temporal for n in moved)


def test_resume_is_exact(base, tmp_path):
    root, pipeline, data = base
    config = _config(root, pipeline, data, trainer={"train_num_steps": 3, "save_model_every": 1})
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli("train", "--config", str(config), "--out", str(whole)) == 0
    assert run_cli("train", "--config", str(config), "--out", str(part), "--set", "trainer.train_num_steps=2") == 0
    assert run_cli("train", "--out", str(part), "--resume", "--set", "trainer.train_num_steps=3") == 0
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (whole, part)]
    assert losses[0] == losses[1]
    a, b = (load_run(run, weights="model").state_dict() for run in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_changes_only_what_it_wraps(base, tmp_path):
    root, pipeline, data = base
    config = _config(root, pipeline, data, pretrained={"lora_rank": 2})
    run = tmp_path / "lora"
    assert run_cli("train", "--config", str(config), "--out", str(run)) == 0
    trained = load_run(run, weights="model").denoise_fn.model
    fresh = build_diffusion(RunConfig.from_dict(json.loads((run / "config.json").read_text()))).denoise_fn.model
    lora = [n for n, _ in trained.named_parameters() if "lora_" in n]
    assert lora and all(".temporal." not in n for n in lora)
    before = dict(fresh.named_parameters())
    temporal = {id(p) for p in trained.temporal_parameters()}
    for name, p in trained.named_parameters():
        changed = not torch.equal(p, before[name])
        if "lora_" not in name and id(p) not in temporal:
            assert not changed, name
    assert any(not torch.equal(p, before[n]) for n, p in trained.named_parameters() if "lora_B" in n)
    # The trained parts alone: one small file onto a fresh inflate with the same LoRA.
    path = trained.save_temporal(tmp_path / "motion.safetensors")
    fresh.load_temporal(path)
    for name, p in trained.named_parameters():
        assert torch.equal(p, dict(fresh.named_parameters())[name]), name


@pytest.mark.parametrize("change, message", [
    (lambda p: shutil.rmtree(p / "unet"), "not a diffusers pipeline folder: no unet/"),
    (lambda p: (p / "vae" / "config.json").unlink(), "has no config.json"),
    (lambda p: [f.unlink() for f in (p / "text_encoder").glob("*.safetensors")], "holds no weights"),
    (lambda p: (p / "tokenizer" / "vocab.json").unlink(), "has no vocab.json"),
])
def test_bad_layouts_are_one_clear_error(base, tmp_path, capsys, change, message):
    root, pipeline, data = base
    broken = tmp_path / "sd"
    shutil.copytree(pipeline, broken)
    change(broken)
    config = _config(tmp_path, broken, data)
    capsys.readouterr()
    assert run_cli("train", "--config", str(config), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_vae_channels_must_match_the_unet(tmp_path, base):
    _, _, data = base
    pipeline = write_pipeline(tmp_path / "sd", vae_latent_channels=8)
    with pytest.raises(ConfigError, match="makes 8-channel latents but the U-Net .* takes in_channels=4"):
        RunConfig.from_dict(json.loads(_config(tmp_path, pipeline, data).read_text()))
    with pytest.raises(ConfigError, match="the U-Net comes from pretrained; remove unet"):
        RunConfig.from_dict({"unet": "unet3d", "pretrained": {"path": str(pipeline)},
                             "diffusion": {"image_size": 16, "num_frames": 4}})
    with pytest.raises(ConfigError, match="is not a local folder"):
        RunConfig.from_dict({"pretrained": {"path": str(tmp_path / "none")}, "diffusion": {"image_size": 16, "num_frames": 4}})


def test_unknown_unet_class_and_missing_text_encoder(tmp_path, base):
    _, pipeline, data = base
    copy = tmp_path / "sd"
    shutil.copytree(pipeline, copy)
    shutil.rmtree(copy / "text_encoder")
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ConfigError, match="cross-attends to text .* no text_encoder"):
        RunConfig.from_dict(json.loads(_config(tmp_path, copy, data).read_text()))
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet1DModel"}))
    with pytest.raises(ConfigError, match="'UNet1DModel' .* is not a U-Net this library drives"):
        RunConfig.from_dict(json.loads(_config(tmp_path, copy, data).read_text()))
