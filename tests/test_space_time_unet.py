"""SpaceTimeUnet specifics: shapes over random configs, the make-a-video README example, text
conditioning, the full-3D conv block kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unets import SpaceTimeUnet
from unets.blocks import Conv3dBlock


@st.composite
def configs_and_inputs(draw):
    levels = draw(st.integers(1, 3))
    per_level = lambda s: draw(st.lists(s, min_size=levels, max_size=levels).map(tuple))  # noqa: E731
    config = dict(
        dim=draw(st.sampled_from([4, 8])),
        channels=draw(st.integers(1, 3)),
        dim_mult=per_level(st.integers(1, 2)),
        self_attns=per_level(st.booleans()),
        temporal_compression=per_level(st.booleans()),
        resnet_block_depths=per_level(st.integers(1, 2)),
        attn_dim_head=draw(st.sampled_from([4, 8])),
        attn_heads=draw(st.integers(1, 2)),
        attn_pos_bias=draw(st.sampled_from([True, False, "t5", "rotary"])),
        causal_time_attn=draw(st.booleans()),
        condition_on_timestep=draw(st.booleans()),
        blocks={"conv": draw(st.sampled_from(["pseudo3d", "conv3d"]))},
    )
    frame_multiple = 2 ** sum(config["temporal_compression"])
    frames = frame_multiple * draw(st.integers(1, 2))
    height = 2**levels * draw(st.integers(1, 2))
    width = 2**levels * draw(st.integers(1, 2))
    batch = draw(st.integers(1, 2))
    return config, (batch, config["channels"], frames, height, width)


@settings(max_examples=10)
@given(configs_and_inputs())
def test_output_shape_equals_input_shape(case):
    config, shape = case
    torch.manual_seed(0)
    model = SpaceTimeUnet(**config)
    assert model.frame_multiple == 2 ** sum(config["temporal_compression"])
    assert model.size_multiple == 2 ** len(config["dim_mult"])
    t = torch.randint(0, 1000, (shape[0],)) if config["condition_on_timestep"] else None
    video = torch.randn(shape)
    image = video[:, :, 0]
    with torch.no_grad():
        assert model(video, t).shape == video.shape
        assert model(image, t).shape == image.shape
        assert model(video, t, enable_time=False).shape == video.shape


def test_make_a_video_readme_example():
    # The README's example with only the import changed and `.cuda()` dropped. Sizes shrunk
    # from 128x128 (16 frames) to 16x16 (4 frames): the original takes minutes on a shared CPU.
    from unets import SpaceTimeUnet

    unet = SpaceTimeUnet(
        dim = 64,
        channels = 3,
        dim_mult = (1, 2, 4, 8),
        resnet_block_depths = (1, 1, 1, 2),
        temporal_compression = (False, False, False, True),
        self_attns = (False, False, False, True),
        condition_on_timestep = False,
        attn_pos_bias = False,
        flash_attn = True
    )

    # train on images
    images = torch.randn(1, 3, 16, 16)
    images_out = unet(images)
    assert images.shape == images_out.shape

    # then train on videos
    video = torch.randn(1, 3, 4, 16, 16)
    video_out = unet(video)
    assert video_out.shape == video.shape

    # or even treat your videos as images
    video_as_images_out = unet(video, enable_time = False)
    assert video_as_images_out.shape == video.shape


def _tiny(**overrides) -> SpaceTimeUnet:
    torch.manual_seed(0)
    config = dict(dim=8, dim_mult=(1, 2), self_attns=(False, True), temporal_compression=(False, True),
                  resnet_block_depths=(1, 1), attn_dim_head=8, attn_heads=2)
    model = SpaceTimeUnet(**{**config, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_text_conditioning_tokens_mask_and_null():
    model = _tiny(cond_dim=12)
    x, t = torch.randn(2, 3, 2, 8, 8), torch.tensor([10, 500])
    tokens = torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        out = model(x, t, cond=tokens, cond_mask=mask)
        # Padding tokens are ignored ...
        changed = tokens.clone()
        changed[0, 3:] = 100.0
        torch.testing.assert_close(model(x, t, cond=changed, cond_mask=mask), out, atol=1e-5, rtol=1e-5)
        # ... real ones are not.
        changed[0, 0] = 100.0
        assert not torch.allclose(model(x, t, cond=changed, cond_mask=mask)[0], out[0], atol=1e-4)
        # A pooled vector is one token.
        pooled = tokens[:, 0]
        torch.testing.assert_close(model(x, t, cond=pooled), model(x, t, cond=pooled[:, None]), atol=1e-6, rtol=1e-6)
        # No condition at all == the null condition.
        torch.testing.assert_close(model(x, t), model(x, t, cond=tokens, null_cond_prob=1.0), atol=1e-5, rtol=1e-5)
    # Condition dropout is per sample.
    torch.manual_seed(1)
    with torch.no_grad():
        outs = [model(x, t, cond=tokens, null_cond_prob=0.5) for _ in range(4)]
    assert any(not torch.allclose(o, outs[0]) for o in outs)


def test_conditioning_errors():
    model = _tiny()
    x, t = torch.randn(1, 3, 2, 8, 8), torch.tensor([1])
    with pytest.raises(ValueError, match="cond_dim=None"):
        model(x, t, cond=torch.randn(1, 4))
    with pytest.raises(ValueError, match="pass timestep"):
        model(x)
    with pytest.raises(ValueError, match="focus_present_mask"):
        model(x, t, focus_present_mask=torch.ones(1, 2, dtype=torch.bool))
    conditioned = _tiny(cond_dim=4)
    with pytest.raises(ValueError, match=r"cond must be \(1, 4\)"):
        conditioned(x, t, cond=torch.randn(1, 5))
    with pytest.raises(ValueError, match="null_cond_prob must be in"):
        conditioned(x, t, cond=torch.randn(1, 4), null_cond_prob=1.5)
    unconditioned = _tiny(condition_on_timestep=False)
    with pytest.raises(ValueError, match="condition_on_timestep=False"):
        unconditioned(x, t)


def test_conv3d_blocks_start_as_per_frame_convs_and_then_mix_time():
    conv = Conv3dBlock(3, 5, 3)
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), conv(x, enable_time=False), atol=1e-6, rtol=1e-6)
        conv.temporal.weight.normal_()
        mixed = conv(x)
        # Reference: the same kernel as one nn.Conv3d.
        full = torch.nn.Conv3d(3, 5, 3, padding=1)
        full.weight.copy_(torch.cat((conv.temporal.weight[:, :, :1], conv.spatial.weight[:, :, None],
                                     conv.temporal.weight[:, :, 1:]), dim=2))
        full.bias.copy_(conv.spatial.bias)
        torch.testing.assert_close(mixed, full(x), atol=1e-5, rtol=1e-5)
        per_sample = conv(x, enable_time=torch.tensor([False, True]))
    torch.testing.assert_close(per_sample[1], mixed[1])
    torch.testing.assert_close(per_sample[0], conv(x[:1], enable_time=False)[0])
    assert [id(p) for p in conv.temporal.parameters()] == [id(conv.temporal.weight)]


def test_conv3d_causal_time_does_not_look_ahead():
    conv = Conv3dBlock(2, 2, 3, causal_time=True)
    with torch.no_grad():
        conv.temporal.weight.normal_()
        x = torch.randn(1, 2, 4, 5, 5)
        later = x.clone()
        later[:, :, 3] += 1.0
        torch.testing.assert_close(conv(x)[:, :, :3], conv(later)[:, :, :3])


def test_no_skip_tensor_clones():
    # make-a-video clones every skip tensor; ours stores them as they are. Count clone calls.
    model = _tiny()
    calls = []
    original = torch.Tensor.clone
    torch.Tensor.clone = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 2, 8, 8), torch.tensor([1]))
    finally:
        torch.Tensor.clone = original
    assert calls == []
