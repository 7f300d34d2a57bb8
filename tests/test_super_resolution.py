"""Spatial super-resolution: the U-Nets' low-res input (unets/lowres_cond.py), the
`SuperResolution` stage, its run config, CLI and metrics (diffusion/super_resolution.py,
diffusion/evaluate_sr.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unets
from diffusion import FlowMatching, GaussianDiffusion, SuperResolution, load_run
from diffusion.cli import main
from diffusion.config import ConfigError, RunConfig
from diffusion.evaluate_sr import (
    evaluate_super_resolution,
    gaussian_window,
    held_out_digits,
    psnr,
    ssim,
)
from diffusion.presets import get_preset
from diffusion.super_resolution import back_project, resize_video

NAMES = unets.available()


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(model: torch.nn.Module, batch: int = 2):
    side = model.size_multiple * max(1, 8 // model.size_multiple)
    x = torch.randn(batch, model.config.channels, 2 * model.frame_multiple, side, side)
    return x, torch.tensor([3, 700, 250][:batch])


def _stage(process=GaussianDiffusion, *, image_size: int = 16, lowres: int = 8, frames: int = 4, channels: int = 1,
           **unet_options) -> SuperResolution:
    net = unets.build("space_time_unet", preset="debug", channels=channels, lowres_cond=True,
                      temporal_compression=(False, False), **unet_options)
    options = {"objective": "v"} if process is GaussianDiffusion else {}
    diffusion = process(net, image_size=image_size, num_frames=frames, channels=channels, timesteps=20, **options)
    return SuperResolution(diffusion, lowres_size=lowres)


# --- the U-Nets' low-resolution input ---------------------------------------------------------


@pytest.fixture(scope="module", params=NAMES)
def name(request):
    return request.param


def test_old_weights_load_strictly_and_give_the_same_output(name, tmp_path):
    torch.manual_seed(0)
    plain = _perturbed(unets.build(name, preset="debug"))
    sr = unets.build(name, preset="debug", lowres_cond=True).eval()
    with torch.no_grad():  # trained values must be reset to the zero start
        sr.lowres.input.weight.fill_(1.0)
        sr.lowres.level.out_weight.fill_(1.0)
    result = sr.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x, t = _inputs(plain)
    lowres = torch.rand_like(x)
    with torch.no_grad():
        expected = plain(x, t)
        assert torch.equal(sr(x, t, lowres_cond=lowres, lowres_noise_level=torch.tensor([0.0, 0.7])), expected)
        assert torch.equal(sr(x, t), expected)
    folder = plain.save_pretrained(tmp_path / "plain")
    weights = unets.io.load_file(str(folder / "model.safetensors"))
    loaded = unets.load_weights(unets.build(name, preset="debug", lowres_cond=True).eval(), weights)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, lowres_cond=lowres, lowres_noise_level=0.3), expected)


def test_trained_input_and_level_reach_the_output_and_round_trip(name, tmp_path):
    torch.manual_seed(1)
    model = _perturbed(unets.build(name, preset="debug", lowres_cond=True))
    x, t = _inputs(model)
    lowres = torch.rand_like(x)
    with torch.no_grad():
        out = model(x, t, lowres_cond=lowres, lowres_noise_level=0.2)
        assert not torch.allclose(out, model(x, t, lowres_cond=lowres * 0.5, lowres_noise_level=0.2))
        assert not torch.allclose(out, model(x, t, lowres_cond=lowres, lowres_noise_level=0.9))
        # Sample 1's condition does not touch sample 0.
        other = lowres.clone()
        other[1] = torch.rand_like(other[1])
        changed = model(x, t, lowres_cond=other, lowres_noise_level=0.2)
        torch.testing.assert_close(changed[0], out[0])
    folder = model.save_pretrained(tmp_path / "sr")
    again = unets.load(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, lowres_cond=lowres, lowres_noise_level=0.2), out)


def test_errors_name_what_was_given(name):
    plain = unets.build(name, preset="debug").eval()
    x, t = _inputs(plain)
    with pytest.raises(ValueError, match="built without low-resolution conditioning"):
        plain(x, t, lowres_cond=torch.rand_like(x))
    model = unets.build(name, preset="debug", lowres_cond=True).eval()
    with pytest.raises(ValueError, match="upsampled to the input's shape"):
        model(x, t, lowres_cond=torch.rand_like(x)[..., :-1])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        model(x, t, lowres_cond=torch.rand_like(x), lowres_noise_level=1.5)
    with pytest.raises(ValueError, match="lowres_cond is missing"):
        model(x, t, lowres_noise_level=0.1)
    with pytest.raises(TypeError, match="lowres_cond"):
        unets.build(name, preset="debug", lowres_cond=1)


@settings(max_examples=8)
@given(batch=st.integers(1, 2), frames=st.integers(1, 5), side=st.sampled_from([4, 8, 12]),
       channels=st.sampled_from([1, 3]), image=st.booleans())
def test_shapes_kept_for_any_frames_sizes_and_channels(batch, frames, side, channels, image):
    torch.manual_seed(0)
    model = _perturbed(unets.build("space_time_unet", preset="debug", channels=channels, lowres_cond=True,
                                   temporal_compression=(False, False)))
    shape = (batch, channels, side, side) if image else (batch, channels, frames, side, side)
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x, torch.full((batch,), 5), lowres_cond=torch.rand(shape), lowres_noise_level=torch.rand(batch))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_diffusers_export_refuses_the_extra_input():
    model = unets.build("modelscope", preset="debug", lowres_cond=True)
    with pytest.raises(ValueError, match="lowres_cond"):
        model.save_diffusers("/nonexistent/never-written")


# --- the stage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [GaussianDiffusion, FlowMatching])
def test_augmentation_at_level_zero_is_the_clean_upsampled_condition(process):
    stage = _stage(process)
    lowres = torch.rand(2, 1, 4, 8, 8)
    up = stage.upsample_baseline(lowres)
    torch.testing.assert_close(up, resize_video(lowres, (16, 16), "bicubic").clamp(0, 1))
    assert torch.equal(stage.augment(up, torch.zeros(2)), up * 2 - 1)
    mixed = stage.augment(up, torch.tensor([0.0, 0.5]))
    assert torch.equal(mixed[0], up[0] * 2 - 1) and not torch.allclose(mixed[1], up[1] * 2 - 1)
    # Level 1 is (nearly) all noise: the process's last timestep / time 1.
    noisy = stage.augment(up, torch.ones(2))
    assert abs(float(noisy.std()) - 1.0) < 0.1


@pytest.mark.parametrize("process", [GaussianDiffusion, FlowMatching])
def test_training_loss_backpropagates_into_the_new_input(process):
    torch.manual_seed(0)
    stage = _stage(process)
    # From zero the projection gets a gradient only once the layers above see it: perturb.
    _perturbed(stage.denoise_fn).train()
    loss = stage(torch.rand(2, 1, 4, 16, 16), times=torch.tensor([3, 15]), noise=torch.randn(2, 1, 4, 16, 16))
    loss.backward()
    assert torch.isfinite(loss)
    assert stage.denoise_fn.lowres.input.weight.grad.abs().sum() > 0
    assert stage.denoise_fn.lowres.level.out_weight.grad.abs().sum() > 0


@settings(max_examples=6)
@given(batch=st.integers(1, 3), frames=st.integers(1, 7), image=st.booleans())
def test_sample_shapes_for_any_frame_count(batch, frames, image):
    torch.manual_seed(0)
    stage = _stage().eval()
    lowres = torch.rand(batch, 1, 8, 8) if image else torch.rand(batch, 1, frames, 8, 8)
    out = stage.sample(lowres, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    expected = (batch, 1, 16, 16) if image else (batch, 1, frames, 16, 16)
    assert out.shape == expected and 0 <= float(out.min()) and float(out.max()) <= 1


def test_guided_sampling_repeats_the_condition_for_the_doubled_batch():
    torch.manual_seed(0)
    stage = _stage(cond_dim=8).eval()
    _perturbed(stage.denoise_fn)
    lowres, cond = torch.rand(2, 1, 3, 8, 8), torch.randn(2, 8)

    def run(batched: bool) -> torch.Tensor:
        return stage.sample(lowres, cond=cond, cond_scale=3.0, sampler="ddim", steps=2,
                            generator=torch.Generator().manual_seed(0), batched_guidance=batched)

    batched, two_calls = run(True), run(False)
    torch.testing.assert_close(batched, two_calls, atol=1e-5, rtol=1e-5)


def test_same_generator_same_sample_and_the_noise_level_matters():
    torch.manual_seed(0)
    stage = _stage().eval()
    _perturbed(stage.denoise_fn)
    lowres = torch.rand(1, 1, 2, 8, 8)

    def run(level):
        return stage.sample(lowres, sampler="ddim", steps=2, noise_level=level,
                            generator=torch.Generator().manual_seed(3))

    assert torch.equal(run(0.1), run(0.1))
    assert not torch.allclose(run(0.1), run(0.6))


# Back-projection: after this many steps the output downsampled matches the low-res input to
# within BACK_PROJECTION_TOLERANCE (max abs error, values in [0, 1]) on any input pair.
BACK_PROJECTION_STEPS = 20
BACK_PROJECTION_TOLERANCE = 0.02


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), frames=st.integers(1, 3), factor=st.sampled_from([2, 4]))
def test_back_projection_makes_the_output_downsample_to_its_input(seed, frames, factor):
    generator = torch.Generator().manual_seed(seed)
    # Ground-truth-like low-res input (a downsampled image) and an unrelated guess.
    truth = torch.rand(2, 1, frames, 32, 32, generator=generator)
    lowres = resize_video(truth, (32 // factor, 32 // factor), "bicubic").clamp(0, 1)
    guess = torch.rand(2, 1, frames, 32, 32, generator=generator)
    out = back_project(guess, lowres, steps=BACK_PROJECTION_STEPS)
    before = (resize_video(guess, lowres.shape[-2:], "bicubic") - lowres).abs().max()
    after = (resize_video(out, lowres.shape[-2:], "bicubic") - lowres).abs().max()
    assert after <= BACK_PROJECTION_TOLERANCE < before
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_sample_with_back_projection_matches_its_input():
    torch.manual_seed(0)
    stage = _stage().eval()
    _perturbed(stage.denoise_fn)
    lowres = stage.downsample(torch.rand(2, 1, 3, 16, 16))
    out = stage.sample(lowres, sampler="ddim", steps=2, back_projection=BACK_PROJECTION_STEPS)
    assert (stage.downsample(out) - lowres).abs().max() <= BACK_PROJECTION_TOLERANCE


def test_stage_errors():
    plain = GaussianDiffusion(unets.build("space_time_unet", preset="debug", channels=1), image_size=16,
                              num_frames=4, channels=1, timesteps=20)
    with pytest.raises(ValueError, match="built without lowres_cond"):
        SuperResolution(plain, lowres_size=8)
    stage = _stage()
    with pytest.raises(ValueError, match="below the process's image size"):
        SuperResolution(stage.process, lowres_size=16)
    with pytest.raises(ValueError, match="noise_aug"):
        SuperResolution(stage.process, lowres_size=8, noise_aug=1.5)
    with pytest.raises(ValueError, match="did you mean 'bicubic'"):
        SuperResolution(stage.process, lowres_size=8, upsample="bicubik")
    with pytest.raises(ValueError, match=r"lowres must be videos \(B, 1, F, 8, 8\)"):
        stage.sample(torch.rand(1, 1, 2, 16, 16), steps=2)
    with pytest.raises(ValueError, match="pass lowres"):
        stage.sample(batch_size=2)
    with pytest.raises(ValueError, match="batch_size=3 differs"):
        stage.sample(torch.rand(2, 1, 2, 8, 8), batch_size=3)
    with pytest.raises(ValueError, match="unconditional"):
        stage.sample(torch.rand(2, 1, 2, 8, 8), cond=["a", "b"])
    with pytest.raises(ValueError, match="2 entries for 1 low-res"):
        _stage(cond_dim=8).sample(torch.rand(1, 1, 2, 8, 8), cond=torch.randn(2, 8))


# --- metrics -----------------------------------------------------------------------------------


def test_psnr_known_values():
    target = torch.zeros(2, 1, 2, 16, 16)
    pred = target + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 40.0]))
    assert math.isinf(float(psnr(target, target)[0]))


def test_ssim_identical_constant_and_symmetric():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 2, 16, 16)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # Two constant images: the structure terms are C2 / C2, the luminance term is closed form.
    a, b = 0.3, 0.7
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    torch.testing.assert_close(value, torch.tensor([expected]))
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert bool((ssim(x, y) < 1).all()) and bool((ssim(x, 1 - x) < ssim(x, y)).all())
    window = gaussian_window(11, 1.5)
    assert window.shape == (11,) and abs(float(window.sum()) - 1) < 1e-12 and int(window.argmax()) == 5
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24)
    reference = metrics.structural_similarity(x[0, 0].double().numpy(), y[0, 0].double().numpy(), data_range=1.0,
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(float(ssim(x, y)) - reference) < 1e-4


def test_evaluation_scores_bicubic_against_itself_exactly():
    torch.manual_seed(0)
    stage = _stage().eval()
    videos = torch.rand(3, 1, 4, 16, 16)
    results = evaluate_super_resolution(stage, videos, batch_size=2, sampler="ddim", steps=2)
    bicubic = stage.upsample_baseline(stage.downsample(videos))
    torch.testing.assert_close(torch.tensor(results["bicubic"]["psnr"]["values"]), psnr(bicubic, videos))
    assert results["num_videos"] == 3
    low, high = results["psnr_gain"]["interval"]
    assert low <= results["psnr_gain"]["mean"] <= high
    assert "bicubic_back_projected" not in results
    projected = evaluate_super_resolution(stage, videos, batch_size=3, sampler="ddim", steps=2, back_projection=3)
    consistency = projected["bicubic_back_projected"]["consistency_psnr"]["mean"]
    assert consistency > results["bicubic"]["consistency_psnr"]["mean"]


# --- run config, training, load_run, CLI -----------------------------------------------------


def _sr_config(**sections) -> dict:
    config = get_preset("debug")
    config["model"].pop("cond_dim")
    config["diffusion"].update(image_size=16, num_frames=4, null_cond_prob=0.0)
    config["data"].update(digit_size=8)
    config["sample"] = {"sampler": "ddim", "steps": 2, "batch_size": 4}
    config["super_resolution"] = {"lowres_size": 8, "noise_aug": 0.2, "sample_noise_level": 0.1}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"super_resolution": {"lowres_size": 16}},
         "super_resolution.lowres_size must be below diffusion.image_size=16"),
        ({"super_resolution": {"noise_aug": 2}}, "super_resolution.noise_aug"),
        ({"super_resolution": {"nosie_aug": 0.1}}, "did you mean 'noise_aug'"),
        ({"super_resolution": {"upsample": "cubic"}}, "super_resolution.upsample"),
        ({"model": {"lowres_cond": False}}, "model.lowres_cond=False"),
    ],
)
def test_config_errors_name_the_key(change, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RunConfig.from_dict(_sr_config(**change))


def test_resume_refuses_a_changed_super_resolution_section():
    from diffusion.run import resume_conflicts

    saved = RunConfig.from_dict(_sr_config())
    assert resume_conflicts(saved, RunConfig.from_dict(_sr_config())) == []
    changed = resume_conflicts(saved, RunConfig.from_dict(_sr_config(super_resolution={"noise_aug": 0.5})))
    assert len(changed) == 1 and changed[0].startswith("super_resolution (")


def test_config_sets_the_unet_option_and_round_trips():
    config = RunConfig.from_dict(_sr_config())
    assert config.unet.model["lowres_cond"] is True
    again = RunConfig.from_dict(json.loads(config.to_json()))
    assert again.super_resolution == config.super_resolution
    missing = _sr_config()
    missing["super_resolution"] = {"noise_aug": 0.1}
    with pytest.raises(ConfigError, match="super_resolution.lowres_size is required"):
        RunConfig.from_dict(missing)
    with pytest.raises(ConfigError, match="not a pretrained base"):
        RunConfig.from_dict({"pretrained": {"folder": "unused"}, "diffusion": {"image_size": 32, "num_frames": 8},
                             "super_resolution": {"lowres_size": 16}})
    preset = RunConfig.from_dict(get_preset("moving-digits-sr"))
    assert preset.super_resolution.lowres_size == 16 and preset.diffusion.image_size == 32
    assert preset.unet.model.get("cond_dim") is None  # no captions (presets.py says why)


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("sr")
    config = folder / "sr.json"
    config.write_text(json.dumps(_sr_config()))
    run = folder / "run"
    try:
        assert main(["--threads", "1", "-q", "train", "--config", str(config), "--out", str(run),
                     "--set", "trainer.train_num_steps=3"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_debug_training_run_loads_as_the_stage(sr_run):
    assert (sr_run / "final.gif").is_file()  # the grid sampled from downsampled data
    stage = load_run(sr_run)
    assert isinstance(stage, SuperResolution) and not stage.training
    assert stage.lowres_hw == (8, 8) and stage.sample_noise_level == 0.1
    out = stage.sample(torch.rand(2, 1, 7, 8, 8), sampler="ddim", steps=2)
    assert out.shape == (2, 1, 7, 16, 16)


def test_eval_cli_scores_the_run_on_held_out_digits(sr_run, tmp_path, capsys):
    out = tmp_path / "sr.json"
    code = main(["--threads", "1", "-q", "eval", "--sr", str(sr_run), "--num-videos", "3", "--steps", "2",
                 "--num-frames", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "bicubic" in text and "SR gain" in text
    results = json.loads(out.read_text())
    assert results["data_seed"] != results["train_data_seed"]
    assert len(results["sr"]["psnr"]["values"]) == 3 and results["sr"]["ssim"]["mean"] <= 1
    assert results["num_frames"] == 5 and "of 5 frames" in text
    config = RunConfig.from_dict(json.loads((sr_run / "config.json").read_text()))
    videos, seed = held_out_digits(config, 3)
    assert seed == results["data_seed"] and videos.shape == (3, 1, 4, 16, 16)
    with pytest.raises(ValueError, match="training data's seed"):
        held_out_digits(config, 3, seed=0)


def test_eval_cli_usage_errors(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "--sr RUN" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--sr", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
