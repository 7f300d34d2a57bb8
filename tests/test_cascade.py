"""diffusion.Cascade: base -> frame interpolation -> super-resolution, from Python and the CLI."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unets
from diffusion import Cascade, GaussianDiffusion, StageOptions, SuperResolution
from diffusion.cascade import STAGES, parse_cascade_spec, parse_stage_option
from diffusion.cli import main
from diffusion.media import read_video

FLAT = {"temporal_compression": (False, False)}


def _process(frames: int, size: int = 8, **options) -> GaussianDiffusion:
    torch.manual_seed(0)
    net = unets.build("space_time_unet", preset="debug", channels=1, **FLAT, **options)
    return GaussianDiffusion(net, image_size=size, num_frames=frames, channels=1, timesteps=20).eval()


@pytest.fixture(scope="module")
def stages():
    base = _process(3, cond_dim=8)
    interp = _process(5, frame_cond=True)
    sr = SuperResolution(_process(5, size=16, lowres_cond=True), lowres_size=8)
    return base, interp, sr


def _cond(batch: int) -> torch.Tensor:
    return torch.randn(batch, 2, 8, generator=torch.Generator().manual_seed(1))


FAST = {name: {"steps": 2} for name in STAGES}


def fast(*names: str) -> dict:
    return {name: FAST[name] for name in names}


def test_cascade_shapes_and_stage_outputs(stages):
    base, interp, sr = stages
    cascade = Cascade(base, interp, sr, options=FAST)
    assert cascade.stride == 2  # (5 - 1) / (3 - 1): inferred from the frame counts
    assert cascade.num_frames == 5 and cascade.image_hw == (16, 16) and cascade.is_conditional
    out = cascade.sample(_cond(2), generator=torch.Generator().manual_seed(0), return_stages=True)
    assert set(out) == {"base", "interp", "sr"}
    assert out["base"].shape == (2, 1, 3, 8, 8)
    assert out["interp"].shape == (2, 1, 5, 8, 8)
    assert out["sr"].shape == (2, 1, 5, 16, 16)
    # The interpolation stage returns the base frames exactly, every stride-th.
    torch.testing.assert_close(out["interp"][:, :, ::2], out["base"], rtol=0, atol=0)
    for video in out.values():
        assert torch.isfinite(video).all() and video.min() >= 0 and video.max() <= 1
    again = cascade.sample(_cond(2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out["sr"])  # seeded: reproducible


def test_optional_stages(stages):
    base, interp, sr = stages
    only_base = Cascade(base, options=fast("base"))
    assert only_base.sample(_cond(1)).shape == (1, 1, 3, 8, 8)
    # SR straight after the base: its U-Net takes any frame count.
    no_interp = Cascade(base, sr=sr, options=fast("base", "sr"))
    assert no_interp.num_frames == 3 and no_interp.sample(_cond(1)).shape == (1, 1, 3, 16, 16)
    no_sr = Cascade(base, interp, options=fast("base", "interp"))
    assert no_sr.sample(_cond(1)).shape == (1, 1, 5, 8, 8)


def test_each_stage_gets_its_options_and_captions_only_where_taken(stages, monkeypatch):
    base, interp, sr = stages
    calls: dict[str, dict] = {}
    for name, process in (("base", base), ("interp", interp), ("sr", sr.process)):
        original = process.sample

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] = kwargs
            return _original(*args, **kwargs)

        monkeypatch.setattr(process, "sample", spy)
    options = {"base": {"steps": 3, "cond_scale": 2.5}, "interp": StageOptions(sampler="euler", steps=2),
               "sr": {"steps": 2, "sampler": "dpmpp_2m", "noise_level": 0.25}}
    Cascade(base, interp, sr, options=options).sample(_cond(2))
    assert calls["base"]["steps"] == 3 and calls["base"]["cond_scale"] == 2.5 and calls["base"]["sampler"] == "ddim"
    assert calls["interp"]["sampler"] == "euler" and calls["interp"]["steps"] == 2
    assert calls["sr"]["sampler"] == "dpmpp_2m" and calls["sr"]["steps"] == 2
    # The interp and SR stages were trained without text: no caption reaches them.
    assert calls["interp"].get("cond") is None and calls["sr"].get("cond") is None
    assert calls["base"]["cond"].shape == (2, 2, 8)


def test_unconditional_cascade_takes_a_batch_size(stages):
    _, interp, sr = stages
    base = _process(3)
    cascade = Cascade(base, interp, sr, options=FAST)
    assert not cascade.is_conditional
    assert cascade.sample(batch_size=2).shape == (2, 1, 5, 16, 16)
    with pytest.raises(ValueError, match="no stage of this cascade takes a condition"):
        cascade.sample(_cond(2))
    with pytest.raises(ValueError, match="give cond .* or batch_size"):
        cascade.sample()


def test_mismatched_stages_are_refused_before_sampling(stages):
    base, interp, sr = stages
    with pytest.raises(ValueError, match="sr stage takes 1-channel \\(4, 4\\) videos"):
        Cascade(base, sr=SuperResolution(_process(5, size=8, lowres_cond=True), lowres_size=4))
    with pytest.raises(ValueError, match="interp stage makes 1-channel \\(16, 16\\)"):
        Cascade(base, _process(5, size=16, frame_cond=True))
    with pytest.raises(ValueError, match="built without frame_cond"):
        Cascade(base, _process(5))
    with pytest.raises(ValueError, match="cannot infer the interpolation stride"):
        Cascade(base, _process(4, frame_cond=True))
    with pytest.raises(TypeError, match="sr must be a SuperResolution"):
        Cascade(base, interp, sr.process)
    with pytest.raises(TypeError, match="base must be a GaussianDiffusion"):
        Cascade(sr)
    with pytest.raises(ValueError, match="unknown stage option 'step' \\(did you mean 'steps'\\?\\)"):
        Cascade(base, options={"base": {"step": 2}})
    with pytest.raises(ValueError, match="no stage 'sr' in this cascade"):
        Cascade(base, options={"sr": {"steps": 2}})
    with pytest.raises(ValueError, match="sampler"):
        StageOptions(sampler="dpm")
    with pytest.raises(ValueError, match="noise_level"):
        StageOptions(noise_level=1.5)
    # An explicit stride wins over the inferred one, and is checked against the U-Net.
    assert Cascade(base, interp, stride=3).num_frames == 7


@settings(max_examples=30, deadline=None)
@given(st.permutations(STAGES), st.integers(1, 3), st.sampled_from(["runs/a", "b", "/abs/path"]))
def test_parse_cascade_spec_round_trips(order, count, folder):
    chosen = [name for name in order if name == "base"] + [name for name in order if name != "base"][: count - 1]
    text = ",".join(f"{name}={folder}-{name}" for name in chosen)
    assert parse_cascade_spec(text) == {name: f"{folder}-{name}" for name in chosen}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "needs base=DIR"),
        ("interp=a", "needs a base=DIR stage"),
        ("base=a,bsae=b", "unknown cascade stage 'bsae'"),
        ("base=a,base=b", "given twice"),
        ("base", "entries are STAGE=DIR"),
    ],
)
def test_parse_cascade_spec_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_cascade_spec(text)


def test_parse_stage_option():
    assert parse_stage_option("interp.steps=20") == ("interp", "steps", 20)
    assert parse_stage_option("sr.noise_level=0.2") == ("sr", "noise_level", 0.2)
    assert parse_stage_option("base.sampler=dpmpp_2m") == ("base", "sampler", "dpmpp_2m")
    assert parse_stage_option("base.eta=null") == ("base", "eta", None)
    for bad in ("steps=20", "interp.steps", "sr=2", "top.steps=2"):
        with pytest.raises(ValueError):
            parse_stage_option(bad)


# --- from run folders and the command line ------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three debug runs: base (4 frames, 8 px, captions), interp (7 frames = 2 * (4 - 1) + 1),
    SR (8 -> 16 px); one training step each."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("cascade")
    common = ["--set", "trainer.train_num_steps=1", "--set", "trainer.save_and_sample_every=1"]
    stages = {
        "base": [],
        "interp": ["--set", "model.frame_cond=true", "--set", "diffusion.num_frames=7", "--set",
                   "trainer.frame_masks={interpolate: 1, future: 0, first_frame: 0, unconditional: 0, strides: [2]}"],
        "sr": ["--set", "super_resolution={lowres_size: 8}", "--set", "diffusion.image_size=16",
               "--set", "data.digit_size=8", "--set", "model.cond_dim=null"],
    }
    try:
        for name, extra in stages.items():
            assert main(["--threads", "1", "-q", "train", "--preset", "debug", "--out", str(root / name),
                         *common, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def test_from_runs_reads_each_run_and_its_sample_defaults(runs):
    cascade = Cascade.from_runs(runs / "base", runs / "interp", runs / "sr", options={"interp": {"steps": 2}})
    assert cascade.stride == 2 and cascade.num_frames == 7 and cascade.image_hw == (16, 16)
    assert cascade.options["base"].steps == 3 and cascade.options["interp"].steps == 2  # debug preset: 3 steps
    assert cascade.sample(["the digit 1 moving up"]).shape == (1, 1, 7, 16, 16)


def test_cli_samples_a_cascade(runs, tmp_path, capsys):
    out = tmp_path / "samples"
    spec = f"base={runs / 'base'},interp={runs / 'interp'},sr={runs / 'sr'}"
    code = main(["--threads", "1", "sample", "--cascade", spec, "--prompt", "the digit 4 moving left",
                 "--num-samples", "2", "--steps", "2", "--stage-option", "sr.noise_level=0.2", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "7 frames at 16x16" in text
    gifs = sorted(out.glob("*.gif"))
    assert len(gifs) == 2 and len(list(out.glob("*.txt"))) == 2
    video = read_video(gifs[0], channels=1)
    assert video.shape == (1, 7, 16, 16)
    assert (out / gifs[0].name.replace(".gif", ".txt")).read_text() == "the digit 4 moving left\n"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--stage-option", "sr.steps=2", "--cascade", "base=BASE"], "the cascade has no sr stage"),
        (["--cascade", "base=BASE,bsae=x"], "unknown cascade stage 'bsae'"),
        (["--cascade", "base=/no/such/run"], "does not exist"),
        (["--cascade", "base=BASE", "--checkpoint", "BASE"], "leave out --checkpoint"),
        (["--checkpoint", "BASE", "--stage-option", "base.steps=2"], "--stage-option goes with --cascade"),
        (["--cascade", "base=BASE", "--stage-option", "base.stpes=2"], "did you mean 'steps'"),
    ],
)
def test_cli_cascade_errors_are_one_line(runs, tmp_path, capsys, extra, fragment):
    argv = [a.replace("BASE", str(runs / "base")) for a in extra]
    assert main(["sample", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spacetime: error: ") and err.count("\n") == 1 and fragment in err, err



def test_stride_from_the_interp_runs_masks_when_it_trained_on_short_clips(stages):
    from types import SimpleNamespace

    base, interp, _ = stages
    short = _process(4, frame_cond=True)  # 4 frames do not fit 3 base frames at any stride

    def config(masks):
        return SimpleNamespace(trainer=SimpleNamespace(frame_masks=masks))

    assert Cascade._trained_stride(base, config(None), interp) == 2  # frame counts fit: 2 * (3 - 1) + 1
    assert Cascade._trained_stride(base, config({"strides": [3]}), short) == 3
    assert Cascade._trained_stride(base, config({"strides": [2, 4]}), short) is None
    assert Cascade._trained_stride(base, config(None), short) is None
    cascade = Cascade(base, short, stride=3, options={"base": {"steps": 2}, "interp": {"steps": 2}})
    # Trained on 4 frames = 2 given at stride 3: the 3 base frames are filled 2 at a time, in
    # two calls at the stage's own length, sharing the middle given frame.
    assert cascade.interp_window == 2
    lengths = []
    original = short.sample

    def spy(*args, **kwargs):
        lengths.append(kwargs["num_frames"])
        return original(*args, **kwargs)

    short.sample = spy
    out = cascade.sample(_cond(1), return_stages=True)
    assert lengths == [4, 4] and out["interp"].shape == (1, 1, 7, 8, 8)
    torch.testing.assert_close(out["interp"][:, :, ::3], out["base"], rtol=0, atol=0)
    cascade.set_options("interp", {"window": 3})  # all three given frames in one call
    lengths.clear()
    cascade.sample(_cond(1))
    assert lengths == [7]
