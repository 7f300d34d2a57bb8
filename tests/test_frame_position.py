"""FramePositionEmbedding: the absolute frame index a denoiser needs to tell a motion from
the same motion played backwards; identity at init, images untouched, in SpaceTimeUnet."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import unets
from spacetime import FramePositionEmbedding, spatial_parameters, temporal_parameters
from unets import SpaceTimeUnet


def _perturbed(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


@given(
    batch=st.integers(1, 3), channels=st.integers(1, 6), frames=st.integers(1, 9),
    height=st.integers(1, 4), width=st.integers(1, 4),
)
def test_identity_at_init_and_per_frame_offsets_after(batch, channels, frames, height, width):
    x = torch.randn(batch, channels, frames, height, width)
    module = FramePositionEmbedding(channels)
    assert torch.equal(module(x), x)
    _perturbed(module)
    out = module(x)
    assert out.shape == x.shape
    offset = out - x
    # One vector per frame, the same at every pixel and for every sample.
    expected = module.embedding(frames).t()[None, :, :, None, None].expand_as(x)
    torch.testing.assert_close(offset, expected)
    if frames > 1:
        assert not torch.allclose(offset[:, :, 0], offset[:, :, -1])


def test_images_and_time_off_pass_through():
    module = _perturbed(FramePositionEmbedding(4))
    image = torch.randn(2, 4, 5, 5)
    assert torch.equal(module(image), image)
    video = torch.randn(2, 4, 3, 5, 5)
    assert torch.equal(module(video, enable_time=False), video)
    mixed = module(video, enable_time=torch.tensor([True, False]))
    assert torch.equal(mixed[1], video[1])
    torch.testing.assert_close(mixed[0], module(video)[0])


def test_embedding_is_temporal_and_learns_frame_order():
    module = FramePositionEmbedding(3, freq_dim=8)
    assert {id(p) for p in temporal_parameters(module)} == {id(p) for p in module.parameters()}
    assert not list(spatial_parameters(module))
    # A constant clip carries no order; with the embedding a per-frame target is learnable,
    # e.g. a ramp that tells the first frame from the last.
    frames = 8
    x = torch.zeros(2, 3, frames, 2, 2)
    ramp = torch.linspace(-1, 1, frames)[None, None, :, None, None].expand_as(x)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        loss = (module(x) - ramp).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim must be a positive int"),
        (dict(dim=True), "dim must be a positive int"),
        (dict(dim=4, freq_dim=3), "freq_dim must be an even int"),
        (dict(dim=4, max_period=1.0), "max_period must be > 1"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FramePositionEmbedding(**kwargs)


def test_wrong_channels_and_frames_errors():
    module = FramePositionEmbedding(4)
    with pytest.raises(ValueError, match="built for 4 channels"):
        module(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        module.embedding(0)


_TINY = dict(dim=8, dim_mult=(1, 2), self_attns=(False, True), temporal_compression=(False, True),
             resnet_block_depths=(1, 1), attn_dim_head=8, attn_heads=2, channels=1)


def test_space_time_unet_frame_pos_emb():
    torch.manual_seed(0)
    with_pos = SpaceTimeUnet(**_TINY, frame_pos_emb=True).eval()
    plain = SpaceTimeUnet(**_TINY).eval()
    missing, unexpected = plain.load_state_dict(with_pos.state_dict(), strict=False)
    assert missing == [] and set(unexpected) == {"frame_pos.proj.weight", "frame_pos.proj.bias"}
    video, image, t = torch.randn(2, 1, 4, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        # A new embedding changes nothing (it starts at zero) ...
        torch.testing.assert_close(with_pos(video, t), plain(video, t))
        _perturbed(with_pos.frame_pos)
        # ... a trained one moves videos only.
        assert not torch.allclose(with_pos(video, t), plain(video, t), atol=1e-4)
        torch.testing.assert_close(with_pos(image, t), plain(image, t))
        torch.testing.assert_close(with_pos(video, t, enable_time=False), plain(video, t, enable_time=False))
    names = {n for n, p in with_pos.named_parameters() if any(p is q for q in temporal_parameters(with_pos))}
    assert {"frame_pos.proj.weight", "frame_pos.proj.bias"} <= names


def test_space_time_unet_frame_pos_emb_config_round_trip(tmp_path):
    model = unets.build("space_time_unet", **_TINY, frame_pos_emb=True)
    assert model.config.to_dict()["frame_pos_emb"] is True
    _perturbed(model.frame_pos)
    unets.save_pretrained(model, tmp_path / "m")
    loaded = unets.load(tmp_path / "m")
    assert loaded.config.frame_pos_emb is True
    video = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video, torch.tensor([5])), model(video, torch.tensor([5])))
    with pytest.raises(TypeError, match="frame_pos_emb"):
        unets.build("space_time_unet", **_TINY, frame_pos_emb="yes")
