"""Training with frame masks from a run config, frame-rate conditioning through the processes
and the trainer (diffusion/frame_masks.py, diffusion/config.py, diffusion/trainer.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unets
from diffusion import FlowMatching, GaussianDiffusion
from diffusion.cli import main
from diffusion.config import ConfigError, RunConfig, TrainerConfig
from diffusion.frame_masks import FrameMasks, frame_masks_option, masks_from_option
from diffusion.presets import get_preset
from diffusion.trainer import Trainer


def run_cli(*argv: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["--threads", "1", "-q", *argv])
    finally:
        torch.set_num_threads(threads)


class _Videos(torch.utils.data.Dataset):
    """Four random videos (3, 4, 8, 8)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(index))


class _RatedVideos(_Videos):
    frame_rate = 4.0


def _debug_config(**trainer: object) -> dict:
    config = get_preset("debug")
    config["model"]["frame_cond"] = True
    config["trainer"].update(trainer)
    return config


class Spy(torch.nn.Module):
    """Records the keyword arguments of every U-Net call."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.config = net.config
        self.calls: list[dict] = []

    def forward(self, x, t, **kwargs):
        self.calls.append(kwargs)
        return self.net(x, t, **kwargs)


def _spy_process(process_class=GaussianDiffusion, **unet_options) -> tuple[object, Spy]:
    torch.manual_seed(0)
    spy = Spy(unets.build("space_time_unet", preset="debug", temporal_compression=[False, False], **unet_options))
    options = {"timesteps": 20} if process_class is GaussianDiffusion else {}
    return process_class(spy, image_size=8, num_frames=4, channels=3, **options), spy


# --- the config option ---------------------------------------------------------------------


def test_frame_masks_option_fills_defaults_and_round_trips():
    config = RunConfig.from_dict(_debug_config(frame_masks={"interpolate": 0.8, "future": 0.2, "first_frame": 0,
                                                            "unconditional": 0, "strides": [4]}))
    masks = config.trainer.frame_masks
    assert masks == {"future": 0.2, "interpolate": 0.8, "first_frame": 0, "unconditional": 0,
                     "context_frames": [1, 4], "strides": [4]}
    again = RunConfig.from_dict(json.loads(config.to_json()))
    assert again.to_dict() == config.to_dict()
    assert masks_from_option(masks).strides == (4,)
    # true: the defaults; false / null: none
    assert TrainerConfig(frame_masks=True).frame_masks == frame_masks_option("x", FrameMasks())
    assert TrainerConfig(frame_masks=False).frame_masks is None and TrainerConfig().frame_masks is None


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ({"interpolat": 1.0}, ["unknown trainer.frame_masks key 'interpolat'", "did you mean 'interpolate'"]),
        ({"future": 1.5}, ["trainer.frame_masks.future", "1.5"]),
        ({"future": "lots"}, ["trainer.frame_masks.future must be a probability", "'lots'"]),
        ({"future": 0.5}, ["trainer.frame_masks:", "must sum to 1", "1.25"]),
        ({"strides": [4, 0]}, ["trainer.frame_masks.strides[1]", "got 0"]),
        ({"strides": 4}, ["trainer.frame_masks.strides must be a list of ints", "4"]),
        ({"context_frames": [3, 2]}, ["context_frames[1]", "got 2"]),
        ("interpolate", ["trainer.frame_masks must be a mapping", "'interpolate'"]),
    ],
)
def test_frame_masks_option_errors_name_the_key(value, fragments):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(frame_masks=value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_frame_masks_need_a_frame_cond_unet():
    config = get_preset("debug")
    config["trainer"]["frame_masks"] = True
    with pytest.raises(ConfigError, match="trainer.frame_masks .*model.frame_cond: true"):
        RunConfig.from_dict(config)
    torch.manual_seed(0)
    process = GaussianDiffusion(unets.build("space_time_unet", preset="debug", temporal_compression=[False, False]),
                                image_size=8, num_frames=4, channels=1, timesteps=20)
    with pytest.raises(ValueError, match="frame_cond=True"):
        Trainer(process, dataset=_Videos(), frame_masks=True, train_batch_size=1,
                results_folder="unused-never-written")


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.integers(0, 5), min_size=4, max_size=4).filter(lambda w: sum(w) > 0),
       strides=st.lists(st.integers(1, 8), min_size=1, max_size=3), low=st.integers(1, 5), extra=st.integers(0, 5))
def test_any_valid_frame_masks_round_trip(weights, strides, low, extra):
    total = sum(weights)
    given_masks = FrameMasks(*(w / total for w in weights), context_frames=(low, low + extra), strides=tuple(strides))
    option = TrainerConfig(frame_masks=given_masks).frame_masks
    assert masks_from_option(option) == masks_from_option(
        TrainerConfig(frame_masks=json.loads(json.dumps(option))).frame_masks)
    assert masks_from_option(option).strides == tuple(strides)


# --- training with masks --------------------------------------------------------------------


def test_trainer_draws_masks_every_step(tmp_path):
    process, spy = _spy_process(frame_cond=True)
    masks = {"interpolate": 1.0, "future": 0.0, "first_frame": 0.0, "unconditional": 0.0, "strides": [2]}
    trainer = Trainer(process, dataset=_Videos(), frame_masks=masks, train_batch_size=2, gradient_accumulate_every=1,
                      train_num_steps=3, save_and_sample_every=1000, results_folder=str(tmp_path), write_mp4=False)
    trainer.train()
    assert trainer.step == 3 and len(spy.calls) == 3
    for call in spy.calls:
        assert call["cond_frame_mask"].tolist() == [[True, False, True, False]] * 2
        # the given frames are the batch's own (normalised to [-1, 1]), zero elsewhere
        assert float(call["cond_frames"][:, :, 1::2].abs().max()) == 0.0
        assert float(call["cond_frames"][:, :, ::2].abs().max()) > 0.0


def test_cli_trains_with_frame_masks(tmp_path, capsys):
    run = tmp_path / "run"
    masks = "trainer.frame_masks={future: 0.5, interpolate: 0.5, first_frame: 0, unconditional: 0, strides: [2]}"
    assert run_cli("train", "--preset", "debug", "--out", str(run), "--set", "model.frame_cond=true",
                   "--set", masks, "--set", "trainer.train_num_steps=3", "--set", "trainer.save_and_sample_every=3") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["trainer"]["frame_masks"]["strides"] == [2] and config["model"]["frame_cond"] is True
    assert (run / "checkpoint-final" / "model.safetensors").is_file()


def test_cli_frame_masks_errors_are_one_line(tmp_path, capsys):
    code = run_cli("train", "--preset", "debug", "--out", str(tmp_path / "r"), "--set", "trainer.frame_masks=true")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.frame_cond: true" in err
    code = run_cli("train", "--preset", "debug", "--out", str(tmp_path / "r"), "--set", "model.frame_cond=true",
                   "--set", "trainer.frame_masks={strides: [0]}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trainer.frame_masks.strides[0]" in err
    assert not (tmp_path / "r").exists()


def test_print_config_shows_the_full_masks(capsys):
    assert run_cli("train", "--preset", "debug", "--set", "model.frame_cond=true", "--set",
                   "trainer.frame_masks=true", "--print-config") == 0
    config = json.loads(capsys.readouterr().out)
    assert config["trainer"]["frame_masks"]["strides"] == [2, 4]


def test_flow_matching_trains_with_frame_masks():
    process, spy = _spy_process(FlowMatching, frame_cond=True)
    masks = FrameMasks(0.0, 1.0, 0.0, 0.0, strides=(3,))
    loss = process(torch.rand(2, 3, 4, 8, 8), frame_masks=masks)
    assert torch.isfinite(loss)
    assert spy.calls[-1]["cond_frame_mask"].tolist() == [[True, False, False, True]] * 2


# --- fps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_class", [GaussianDiffusion, FlowMatching])
def test_fps_reaches_the_unet(process_class):
    process, spy = _spy_process(process_class, frame_rate_cond=True)
    process(torch.rand(2, 3, 4, 8, 8), fps=4.0)
    assert spy.calls[-1]["fps"] == 4.0
    spy.calls.clear()
    process.sample(batch_size=2, sampler="ddim" if process_class is GaussianDiffusion else "euler", steps=2,
                   fps=torch.tensor([1.0, 4.0]))
    assert len(spy.calls) == 2 and all(call["fps"].tolist() == [1.0, 4.0] for call in spy.calls)
    # a different rate changes the prediction once the embedding has weights
    with torch.no_grad():
        spy.net.fps_embed.out_weight.normal_()
    x, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([5])
    assert not torch.allclose(spy(x, t, fps=1.0), spy(x, t, fps=4.0))


def test_fps_to_a_unet_without_frame_rate_cond_is_an_error():
    process, _ = _spy_process()
    with pytest.raises(ValueError, match="frame_rate_cond=True"):
        process(torch.rand(1, 3, 4, 8, 8), fps=2.0)


def test_trainer_passes_the_data_frame_rate(tmp_path):
    process, spy = _spy_process(frame_rate_cond=True)
    trainer = Trainer(process, dataset=_RatedVideos(), train_batch_size=2, gradient_accumulate_every=1,
                      train_num_steps=2, save_and_sample_every=2, results_folder=str(tmp_path), write_mp4=False,
                      sample_kwargs={"sampler": "ddim", "steps": 2}, num_sample_rows=1)
    trainer.train()
    # two training steps, then the sample grid's two sampling steps (on the EMA copy of the
    # U-Net): all at the data's rate
    grid_calls = trainer.ema_model.denoise_fn.calls
    assert len(spy.calls) == 2 and len(grid_calls) == 2
    assert all(float(call["fps"]) == 4.0 for call in spy.calls + grid_calls)
