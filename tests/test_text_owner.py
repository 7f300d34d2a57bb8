"""GaussianDiffusion as the one owner of text conditioning, and the sampling refusals that
protect a run's outputs (non-finite guidance, non-finite samples, schedules too large)."""

from __future__ import annotations

import copy
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import HashTextEncoder, TinyDenoiser, make_diffusion, make_trainer  # noqa: E402

from diffusion.gaussian import GaussianDiffusion, NonFiniteSampleError, denoiser_cond_format  # noqa: E402
from diffusion.text import CachedTextEncoder, LazyTextEncoder  # noqa: E402


@pytest.fixture(autouse=True)
def time_limit():
    def expire(signum, frame):
        raise TimeoutError("test ran past 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class Declared(nn.Module):
    def __init__(self, cond_format):
        super().__init__()
        self.cond_format = cond_format
        self.cond_on_tokens = True  # ignored: cond_format is declared

    def forward(self, x, t, **kwargs):
        return x


def test_cond_format_is_read_from_the_denoiser_with_one_fallback():
    assert denoiser_cond_format(Declared(None)) is None
    assert denoiser_cond_format(Declared("pooled")) == "pooled"
    assert denoiser_cond_format(Declared("tokens")) == "tokens"
    with pytest.raises(ValueError, match="cond_format must be one of"):
        denoiser_cond_format(Declared("both"))
    # denoisers from before cond_format: today's attributes
    assert denoiser_cond_format(TinyDenoiser(cond_dim=4)) == "pooled"
    assert denoiser_cond_format(TinyDenoiser()) is None
    tokens = TinyDenoiser(cond_dim=4)
    tokens.cond_on_tokens = True
    assert denoiser_cond_format(tokens) == "tokens"


def test_the_process_owns_one_cache_shared_by_its_copies():
    diffusion = make_diffusion()
    assert isinstance(diffusion.text_cache, CachedTextEncoder)
    clone = copy.deepcopy(diffusion)
    assert clone.text_cache is diffusion.text_cache and clone.text_encoder is diffusion.text_encoder
    diffusion.encode_text(["a", "b", "a"])
    clone.encode_text(["b", "a", "c"])
    assert diffusion.text_encoder.seen == ["a", "b", "c"]  # each distinct caption once
    assert not any("text" in name for name in diffusion.state_dict())


def test_the_default_encoder_is_only_loaded_when_used():
    diffusion = GaussianDiffusion(TinyDenoiser(cond_dim=384, timesteps=10), image_size=8, num_frames=4,
                                  channels=1, timesteps=10)
    inner = diffusion.text_cache.encoder
    assert isinstance(inner, LazyTextEncoder) and inner._encoder is None


def test_an_on_disk_cache_is_read_back_by_a_later_process(tmp_path):
    first = make_diffusion()
    first.use_text_cache(tmp_path / "cache")
    first.encode_text(["a red ball", "two digits"])
    later = make_diffusion()
    later.use_text_cache(tmp_path / "cache")
    later.encode_text(["two digits", "a red ball"])
    assert later.text_encoder.seen == [] and later.text_cache.num_disk_hits == 2


def test_the_trainer_patches_no_model_attribute(tmp_path):
    diffusion = make_diffusion()
    encoder, cache = diffusion.text_encoder, diffusion.text_cache
    trainer = make_trainer(tmp_path, diffusion=diffusion, train_num_steps=1, save_and_sample_every=1,
                           num_sample_rows=1, text_cache_dir=tmp_path / "texts")
    trainer.train()
    assert diffusion.text_encoder is encoder and diffusion.text_cache is cache
    assert trainer.ema_model.text_cache is cache and trainer.text_encoder is cache
    assert any((tmp_path / "texts").iterdir())


@given(scale=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_non_finite_guidance_is_refused(scale):
    diffusion = make_diffusion()
    with pytest.raises(ValueError, match="cond_scale"):
        diffusion.sample(cond=["a"], cond_scale=scale, sampler="ddim", steps=2)


def test_non_finite_samples_are_refused_and_no_grid_is_written(tmp_path):
    diffusion = make_diffusion(text=False)
    trainer = make_trainer(tmp_path, diffusion=diffusion, train_num_steps=1, save_and_sample_every=1,
                           num_sample_rows=1)
    with torch.no_grad():
        for p in trainer.ema_model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite"):
        trainer.sample_and_save("broken")
    assert not (tmp_path / "broken.gif").exists()


def test_a_schedule_too_large_for_the_machine_is_refused_before_allocating():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="timesteps=1,000,000,000,000"):
        GaussianDiffusion(TinyDenoiser(), image_size=8, num_frames=4, channels=1, timesteps=10**12)
    assert time.perf_counter() - started < 5
    with pytest.raises(TypeError, match="timesteps"):
        GaussianDiffusion(TinyDenoiser(), image_size=8, num_frames=4, channels=1, timesteps=True)


def test_text_encoder_can_be_replaced_and_the_cache_follows():
    diffusion = make_diffusion()
    other = HashTextEncoder(dim=6)
    diffusion.text_encoder = other
    diffusion.encode_text(["x"])
    assert other.seen == ["x"] and diffusion.text_cache.encoder is other
    with pytest.raises(TypeError, match="encode"):
        diffusion.text_encoder = object()
