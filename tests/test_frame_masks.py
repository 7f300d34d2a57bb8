"""Training masks, known frames through GaussianDiffusion, temporal super-resolution
(diffusion/frame_masks.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unets
from diffusion import GaussianDiffusion
from diffusion.frame_masks import (
    STRATEGIES,
    FrameMasks,
    draw_frame_masks,
    first_frame_mask,
    future_mask,
    interpolation_mask,
    temporal_super_resolution,
    temporal_upsample_layout,
)


def _process(frames: int = 4, *, frame_cond: bool = True, seed: int = 0) -> GaussianDiffusion:
    torch.manual_seed(seed)
    net = unets.build("unet3d", preset="debug", frame_cond=frame_cond)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return GaussianDiffusion(net, image_size=8, num_frames=frames, timesteps=20).eval()


# --- the strategies -----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(frames=st.integers(1, 40), context=st.integers(0, 45), stride=st.integers(1, 9))
def test_strategy_masks(frames, context, stride):
    future = future_mask(frames, context)
    assert future.shape == (frames,) and future.dtype == torch.bool
    assert int(future.sum()) == min(context, frames)
    assert bool(future[: min(context, frames)].all())
    grid = interpolation_mask(frames, stride)
    assert grid.nonzero().flatten().tolist() == list(range(0, frames, stride))
    assert first_frame_mask(frames).nonzero().flatten().tolist() == [0]


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 12), frames=st.integers(1, 16), seed=st.integers(0, 2**16),
    weights=st.lists(st.integers(0, 4), min_size=4, max_size=4).filter(lambda w: sum(w) > 0),
    low=st.integers(1, 4), extra=st.integers(0, 4), strides=st.lists(st.integers(1, 5), min_size=1, max_size=3),
)
def test_drawn_masks_follow_their_kind(batch, frames, seed, weights, low, extra, strides):
    total = sum(weights)
    masks = FrameMasks(*(w / total for w in weights), context_frames=(low, low + extra), strides=tuple(strides))
    mask, kinds = draw_frame_masks(batch, frames, masks, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (batch, frames) and mask.dtype == torch.bool and kinds.shape == (batch,)
    for row, kind in zip(mask, kinds.tolist()):
        name = STRATEGIES[kind]
        assert weights[kind] > 0, "a kind with probability 0 was drawn"
        given_at = row.nonzero().flatten().tolist()
        if name == "unconditional":
            assert given_at == []
        elif name == "first_frame":
            assert given_at == [0]
        elif name == "future":
            assert given_at == list(range(len(given_at)))
            assert len(given_at) <= max(frames - 1, 0) and (frames == 1 or len(given_at) >= min(low, frames - 1))
        else:
            assert any(given_at == list(range(0, frames, s)) for s in strides)


def test_draw_frequencies_match_the_probabilities():
    masks = FrameMasks(future=0.1, interpolate=0.2, first_frame=0.3, unconditional=0.4)
    _, kinds = draw_frame_masks(4000, 8, masks, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(kinds, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(future=0.5), "sum to 1"),
        (dict(future=-0.25, unconditional=0.75), "future"),
        (dict(context_frames=(3, 2)), "context_frames"),
        (dict(context_frames=(1, 2, 3)), "min, max"),
        (dict(strides=()), "strides"),
        (dict(strides=(0,)), "strides"),
    ],
)
def test_frame_masks_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        FrameMasks(**options)


# --- training -----------------------------------------------------------------------------


def test_training_takes_given_frames_or_draws_them():
    process = _process()
    videos = torch.rand(2, 3, 4, 8, 8)
    mask = torch.tensor([[True, False, False, False], [False, True, False, True]])
    noise, times = torch.randn(2, 3, 4, 8, 8), torch.tensor([5, 15])
    plain = process(videos, noise=noise, times=times)
    given_frames = process(videos, noise=noise, times=times, cond_frames=videos, cond_frame_mask=mask)
    assert torch.isfinite(given_frames) and given_frames != plain
    # Unknown frames' content does not matter.
    other = videos.clone()
    other[:, :, 2] = torch.rand_like(other[:, :, 2])
    assert process(videos, noise=noise, times=times, cond_frames=other, cond_frame_mask=mask) == given_frames
    torch.manual_seed(0)
    drawn = process(videos, noise=noise, times=times, frame_masks=FrameMasks(future=1.0, interpolate=0.0,
                                                                               first_frame=0.0, unconditional=0.0))
    assert torch.isfinite(drawn)
    drawn.backward()
    assert process.denoise_fn.frame_cond_in.weight.grad is not None


def test_training_errors():
    process = _process()
    videos = torch.rand(2, 3, 4, 8, 8)
    with pytest.raises(ValueError, match="cond_frame_mask is missing"):
        process(videos, cond_frames=videos)
    with pytest.raises(ValueError, match="not both"):
        process(videos, cond_frames=videos, cond_frame_mask=torch.ones(2, 4, dtype=torch.bool), frame_masks=True)
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        process(videos, cond_frames=videos, cond_frame_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="frame_cond=True"):
        _process(frame_cond=False)(videos, frame_masks=True)


# --- sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler"])
def test_replaced_frames_come_back_exactly(sampler):
    process = _process()
    videos = torch.rand(2, 3, 4, 8, 8)
    mask = torch.tensor([[True, True, False, False], [True, False, False, True]])
    steps = None if sampler == "ddpm" else 4
    out = process.sample(cond_frames=videos, cond_frame_mask=mask, replace_known=True, sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == videos.shape
    expanded = mask[:, None, :, None, None].expand_as(videos)
    torch.testing.assert_close(out[expanded], videos[expanded], rtol=0, atol=1e-6)
    assert not torch.allclose(out[~expanded], videos[~expanded], atol=1e-2)


def test_sampling_passes_the_frames_to_the_unet():
    process = _process()
    videos = torch.rand(1, 3, 4, 8, 8)
    mask = torch.tensor([[True, False, False, False]])

    def run(frames):
        return process.sample(cond_frames=frames, cond_frame_mask=mask, sampler="ddim", steps=3,
                              generator=torch.Generator().manual_seed(1))

    first, again = run(videos), run(videos)
    assert torch.equal(first, again)
    assert not torch.allclose(run(1.0 - videos), first)
    with pytest.raises(ValueError, match="sampled video's shape"):
        process.sample(cond_frames=torch.rand(1, 3, 5, 8, 8), cond_frame_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="frame_cond=True"):
        _process(frame_cond=False).sample(cond_frames=videos, cond_frame_mask=mask, sampler="ddim", steps=2)


# --- temporal super-resolution ------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), frames=st.integers(1, 6), stride=st.integers(1, 4))
def test_upsample_layout(batch, frames, stride):
    video = torch.rand(batch, 2, frames, 3, 3)
    spread, mask = temporal_upsample_layout(video, stride)
    total = stride * (frames - 1) + 1
    assert spread.shape == (batch, 2, total, 3, 3) and mask.shape == (batch, total)
    assert torch.equal(spread[:, :, ::stride], video)
    assert torch.count_nonzero(spread[~mask[:, None, :, None, None].expand_as(spread)]) == 0
    assert mask.sum(dim=1).tolist() == [frames] * batch


def test_temporal_super_resolution_keeps_the_given_frames():
    process = _process()
    frames = torch.rand(2, 3, 3, 8, 8)
    out = temporal_super_resolution(process, frames, 3, sampler="ddim", steps=3)
    assert out.shape == (2, 3, 7, 8, 8)
    torch.testing.assert_close(out[:, :, ::3], frames, rtol=0, atol=1e-6)
    assert ((out >= 0) & (out <= 1)).all()
    with pytest.raises(ValueError, match="num_frames"):
        temporal_super_resolution(process, frames, 2, num_frames=9)
    with pytest.raises(ValueError, match="stride"):
        temporal_upsample_layout(frames, 0)


def test_flow_matching_replaces_known_frames_too():
    from diffusion import FlowMatching

    torch.manual_seed(0)
    net = unets.build("unet3d", preset="debug", frame_cond=True)
    flow = FlowMatching(net, image_size=8, num_frames=4).eval()
    videos = torch.rand(1, 3, 4, 8, 8)
    mask = torch.tensor([[True, False, True, False]])
    out = flow.sample(cond_frames=videos, cond_frame_mask=mask, replace_known=True, sampler="euler", steps=3)
    expanded = mask[:, None, :, None, None].expand_as(videos)
    torch.testing.assert_close(out[expanded], videos[expanded], rtol=0, atol=1e-5)
