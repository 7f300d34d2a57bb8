"""Pretrained video U-Nets through the run config and the CLI (tiny random models saved into
pipeline folders here): a ModelScope folder (`UNet3DConditionModel`) and the AnimateDiff layout
(`UNet2DConditionModel` + `MotionAdapter`) train temporal-only as this library's U-Nets,
resume exactly, and sample with `spacetime sample --pretrained DIR`; the pipeline's scheduler
fixes the process; every bad folder is one clear error."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from byo_models import (
    CROSS_DIM,
    tiny_clip,
    tiny_vae,
    write_clip_tokenizer,
    write_pipeline,
)

from diffusion import media
from diffusion.cli import main
from diffusion.config import ConfigError, RunConfig
from diffusion.pretrained_video import PretrainedVideoUnet, read_scheduler
from diffusion.run import build_diffusion, load_run
from unets import AnimateDiffUnet, ModelScopeUnet

CAPTIONS = ["a red ball moves left", "a blue square moves up", "the red square moves down"]
TIMESTEPS = 50


def run_cli(*argv: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["--threads", "1", "-q", *argv])
    finally:
        torch.set_num_threads(threads)


def _scheduler(folder, **options) -> None:
    settings = {"num_train_timesteps": TIMESTEPS, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "clip_sample": False}
    diffusers.DDIMScheduler(**{**settings, **options}).save_pretrained(folder)


def write_modelscope_pipeline(folder):
    """A text-to-video pipeline folder in the ModelScope layout (UNet3DConditionModel)."""
    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, sample_size=8,
    )
    with torch.no_grad():  # off diffusers' zero init, so the temporal layers change outputs
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_clip().save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")
    _scheduler(folder / "scheduler")
    return folder


def write_motion_adapter(folder):
    torch.manual_seed(1)
    diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    modelscope = write_modelscope_pipeline(root / "ms")
    sd = write_pipeline(root / "sd")
    _scheduler(sd / "scheduler")
    adapter = write_motion_adapter(root / "mm")
    data = root / "data"
    data.mkdir()
    torch.manual_seed(0)
    for i, caption in enumerate(CAPTIONS):
        media.write_gif(torch.rand(3, 4, 16, 16), data / f"{i}.gif")
        (data / f"{i}.txt").write_text(caption + "\n")
    return root, modelscope, sd, adapter, data


def _config(root, pipeline, data, **extra):
    config = {
        "pretrained": {"path": str(pipeline), **extra.pop("pretrained", {})},
        "diffusion": {"image_size": 16, "num_frames": 4, "channels": 3, "timesteps": TIMESTEPS, "null_cond_prob": 0.2,
                      **extra.pop("diffusion", {})},
        "trainer": {"train_num_steps": 2, "train_batch_size": 2, "gradient_accumulate_every": 1,
                    "save_and_sample_every": 1000, "num_sample_rows": 1, "step_start_ema": 0,
                    "sample_kwargs": {"sampler": "ddim", "steps": 2}, **extra.pop("trainer", {})},
        "data": {"kind": "folder", "folder": str(data)},
        "sample": {"sampler": "ddim", "steps": 2},
    }
    path = root / f"run-{len(list(root.glob('run-*.json')))}.json"
    path.write_text(json.dumps(config))
    return path


def _fresh(run):
    return build_diffusion(RunConfig.from_dict(json.loads((run / "config.json").read_text())))


def _assert_temporal_only(run, library_cls):
    trained = load_run(run, weights="model").denoise_fn
    fresh = _fresh(run).denoise_fn
    assert isinstance(trained, PretrainedVideoUnet) and isinstance(trained.model, library_cls)
    before = dict(fresh.model.named_parameters())
    temporal = {id(p) for p in trained.model.temporal_parameters()}
    moved = []
    for name, p in trained.model.named_parameters():
        if id(p) in temporal:
            moved.append(not torch.equal(p, before[name]))
        else:
            assert torch.equal(p, before[name]), name  # spatial: bit-identical
    assert any(moved)
    # The guidance null is the empty caption's tokens (the tokenizer pads to 16), kept in the checkpoint.
    assert trained.null_cond.shape == (16, CROSS_DIM) and torch.equal(trained.null_cond, fresh.null_cond)


@pytest.fixture(scope="module")
def modelscope_run(base):
    root, modelscope, _, _, data = base
    run = root / "ms-run"
    assert run_cli("train", "--config", str(_config(root, modelscope, data)), "--out", str(run)) == 0
    return run


def test_modelscope_folder_trains_temporal_only(modelscope_run):
    _assert_temporal_only(modelscope_run, ModelScopeUnet)


def test_the_scheduler_fixes_the_process(modelscope_run, base):
    _, modelscope, _, _, _ = base
    diffusion = load_run(modelscope_run)
    reference = diffusers.DDIMScheduler.from_pretrained(modelscope / "scheduler")
    assert torch.allclose(diffusion.alphas_cumprod.double(), reference.alphas_cumprod.double(), atol=1e-6)
    process = read_scheduler(modelscope / "scheduler")
    assert process.objective == "noise" and process.timesteps == TIMESTEPS
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), TIMESTEPS, dtype=torch.float64) ** 2
    assert torch.allclose(process.betas, betas)


def test_guided_prediction_equals_the_diffusers_pipeline(base):
    from diffusion.guidance import guided_output
    from diffusion.pretrained_video import open_pretrained

    _, modelscope, _, _, _ = base
    process = open_pretrained(modelscope, num_frames=3).diffusion
    assert process.image_hw == (16, 16) and process.num_timesteps == TIMESTEPS
    reference = diffusers.UNet3DConditionModel.from_pretrained(modelscope / "unet").eval()
    tokens, mask = process.encode_text(["a red ball"])
    empty, _ = process.encode_text([""])
    torch.manual_seed(2)
    x, t = torch.randn(1, 4, 3, 8, 8), torch.tensor([30])
    with torch.no_grad():
        ours = guided_output(process.denoise_fn, x, t, cond=tokens, cond_mask=mask, cond_scale=3.0)
        # What TextToVideoSDPipeline does: the empty prompt as the negative, one batched call.
        pair = reference(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([empty, tokens])).sample
    expected = pair[:1] + 3.0 * (pair[1:] - pair[:1])
    assert (pair[1:] - pair[:1]).abs().max() > 1e-3  # the prompt matters
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_animatediff_layout_trains_temporal_only_with_checkpointing(base, tmp_path):
    _, _, sd, adapter, data = base
    config = _config(tmp_path, sd, data, pretrained={"motion_adapter": str(adapter), "gradient_checkpointing": True})
    run = tmp_path / "ad-run"
    assert run_cli("train", "--config", str(config), "--out", str(run)) == 0
    _assert_temporal_only(run, AnimateDiffUnet)
    model = load_run(run, weights="model").denoise_fn.model
    assert model.gradient_checkpointing
    # The motion modules are exactly what trained: they export as a MotionAdapter.
    trained = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in model.temporal_parameters()}}
    assert trained and all(".motion_modules." in n for n in trained)
    model.save_diffusers(tmp_path / "adapter-out")
    assert diffusers.MotionAdapter.from_pretrained(tmp_path / "adapter-out") is not None


def test_original_motion_module_file_as_motion_adapter(base, tmp_path):
    from safetensors.torch import load_file, save_file

    from unets.original_keys import to_animatediff_original

    _, _, sd, adapter, data = base
    state = load_file(str(adapter / "diffusion_pytorch_model.safetensors"))
    file = tmp_path / "mm_sd_v15_tiny.safetensors"
    save_file(to_animatediff_original(state), str(file))
    config = RunConfig.from_dict(json.loads(_config(tmp_path, sd, data, pretrained={"motion_adapter": str(file)}).read_text()))
    model = build_diffusion(config).denoise_fn.model
    assert isinstance(model, AnimateDiffUnet)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.endswith("pos_embed.pe"))


def test_resume_is_exact(base, tmp_path):
    _, modelscope, _, _, data = base
    config = _config(tmp_path, modelscope, data, trainer={"train_num_steps": 3, "save_model_every": 1})
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli("train", "--config", str(config), "--out", str(whole)) == 0
    assert run_cli("train", "--config", str(config), "--out", str(part), "--set", "trainer.train_num_steps=2") == 0
    assert run_cli("train", "--out", str(part), "--resume", "--set", "trainer.train_num_steps=3") == 0
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (whole, part)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = (load_run(run, weights="model").state_dict() for run in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["modelscope", "animatediff"])
def test_sample_pretrained_writes_gifs(base, tmp_path, layout):
    _, modelscope, sd, adapter, _ = base
    folder = modelscope
    if layout == "animatediff":  # the AnimateDiff pipeline layout: motion_adapter/ beside unet/
        folder = tmp_path / "ad"
        shutil.copytree(sd, folder)
        shutil.copytree(adapter, folder / "motion_adapter")
    out = tmp_path / "samples"
    assert run_cli("sample", "--pretrained", str(folder), "--prompt", "a red ball", "--prompt", "a blue square",
                   "--num-frames", "3", "--steps", "2", "--cond-scale", "3", "--seed", "1", "--out", str(out)) == 0
    gifs = sorted(out.glob("*.gif"))
    assert [g.name for g in gifs] == ["000-a-red-ball.gif", "001-a-blue-square.gif"]
    assert media.read_video(gifs[0]).shape[1:] == (3, 16, 16)
    assert (out / "001-a-blue-square.txt").read_text() == "a blue square\n"


def test_null_condition_replaces_dropped_tokens():
    torch.manual_seed(0)
    model = ModelScopeUnet(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                           up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=4,
                           cond_dim=8, attention_head_dim=4, temporal_dropout=0.0).eval()
    wrapped = PretrainedVideoUnet(model)
    null = torch.randn(3, 8)
    wrapped.set_null_cond(null)
    x, t, cond = torch.randn(2, 4, 2, 8, 8), torch.tensor([5, 40]), torch.randn(2, 5, 8)
    with torch.no_grad():
        dropped = wrapped(x, t, cond=cond, null_cond_prob=1.0)
        assert torch.allclose(dropped, model(x, t, cond=null.expand(2, -1, -1)), atol=1e-5)
        assert torch.allclose(wrapped(x, t), dropped, atol=1e-5)
        assert torch.equal(wrapped(x, t, cond=cond), model(x, t, cond=cond))
    with pytest.raises(ValueError, match=r"null_cond must be token embeddings \(L, 8\)"):
        wrapped.set_null_cond(torch.zeros(3, 4))


def _set(path, **values):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **values}))


@pytest.mark.parametrize("change, extra, message", [
    (lambda p: _set(p / "scheduler" / "scheduler_config.json", thresholding=True), {},
     "thresholding=True .* is not supported"),
    (lambda p: _set(p / "scheduler" / "scheduler_config.json", prediction_type="flow"), {},
     "prediction_type='flow' .* allowed: epsilon, v_prediction, sample"),
    (lambda p: _set(p / "scheduler" / "scheduler_config.json", beta_schedule="exp"), {},
     "beta_schedule='exp' .* not supported"),
    (lambda p: None, {"diffusion": {"timesteps": 40}}, "diffusion.timesteps=40 but the pipeline's scheduler"),
    (lambda p: None, {"diffusion": {"objective": "v"}}, "predicts 'noise'; set diffusion.objective: noise"),
    (lambda p: None, {"pretrained": {"lora_rank": 2}}, "lora_rank applies to inflated 2D U-Nets, not to a UNet3D"),
    (lambda p: None, {"pretrained": {"inflate": {"heads": 2}}}, "pretrained.inflate applies to 2D U-Nets"),
    (lambda p: None, {"pretrained": {"motion_adapter": "x"}}, "motion_adapter goes with a UNet2DConditionModel"),
    (lambda p: None, {"pretrained": {"gradient_checkpointing": "yes"}}, "pretrained.gradient_checkpointing"),
])
def test_bad_video_configs_are_one_clear_error(base, tmp_path, change, extra, message):
    _, modelscope, _, _, data = base
    folder = tmp_path / "ms"
    shutil.copytree(modelscope, folder)
    change(folder)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(json.loads(_config(tmp_path, folder, data, **extra).read_text()))


def test_bad_motion_adapters(base, tmp_path):
    _, modelscope, sd, _, data = base
    with pytest.raises(ConfigError, match="motion_adapter: .* holds a UNet3DConditionModel; accepted: MotionAdapter"):
        RunConfig.from_dict(json.loads(_config(
            tmp_path, sd, data, pretrained={"motion_adapter": str(modelscope / "unet")}).read_text()))
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ConfigError, match="is a file but not a motion-module checkpoint"):
        RunConfig.from_dict(json.loads(_config(tmp_path, sd, data, pretrained={"motion_adapter": str(text)}).read_text()))
    with pytest.raises(ConfigError, match="is neither a local folder nor a file"):
        RunConfig.from_dict(json.loads(_config(
            tmp_path, sd, data, pretrained={"motion_adapter": str(tmp_path / "none")}).read_text()))


@pytest.mark.parametrize("argv, message", [
    (["--pretrained", "{tmp}/none"], "is not a folder"),
    (["--pretrained", "{tmp}", "--prompt", "a"], "not a diffusers pipeline folder: no unet/"),
    (["--pretrained", "{ms}", "--checkpoint", "{tmp}"], "not both"),
    (["--pretrained", "{ms}", "--out", "{tmp}/s"], "needs --prompt"),
    (["--pretrained", "{ms}", "--prompt", "a"], "needs --out"),
    (["--prompt", "a"], "give --checkpoint RUN"),
    (["--checkpoint", "{tmp}", "--num-frames", "3"], "go with --pretrained"),
    (["--pretrained", "{novae}", "--prompt", "a", "--out", "{tmp}/s"], "needs vae/ and text_encoder/"),
])
def test_sample_pretrained_errors(base, tmp_path, capsys, argv, message):
    _, modelscope, _, _, _ = base
    novae = tmp_path / "novae"
    novae.mkdir()
    shutil.copytree(modelscope / "unet", novae / "unet")
    values = {"tmp": str(tmp_path), "ms": str(modelscope), "novae": str(novae)}
    if "--out" not in argv and "needs --out" not in message:
        argv = [*argv, "--out", str(tmp_path / "s")]
    capsys.readouterr()
    assert run_cli("sample", *[a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
