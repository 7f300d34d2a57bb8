"""`unets.from_make_a_video` against the installed make-a-video-pytorch 0.4.0: same outputs
(fp32, atol 1e-4) for videos, images and `enable_time=False`."""

from __future__ import annotations

import pytest
import torch

import unets

make_a_video = pytest.importorskip("make_a_video_pytorch")

BASE = dict(dim=8, dim_mult=(1, 2), self_attns=(False, True), attn_dim_head=8, attn_heads=2)
CONFIGS = {
    "pos-bias-time-compression": dict(BASE, temporal_compression=(False, True), resnet_block_depths=(1, 1)),
    "no-pos-bias-no-compression": dict(BASE, temporal_compression=(False, False), resnet_block_depths=(1, 1),
                                       attn_pos_bias=False),
    "depth-2-three-levels": dict(BASE, dim_mult=(1, 2, 2), self_attns=(True, False, True),
                                 temporal_compression=(True, False, True), resnet_block_depths=(2, 1, 2)),
    "no-timestep-causal": dict(BASE, temporal_compression=(False, True), resnet_block_depths=(1, 1),
                               condition_on_timestep=False, causal_time_attn=True),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_outputs_match_make_a_video(config):
    torch.manual_seed(0)
    reference = make_a_video.SpaceTimeUnet(**config).eval()
    # Random weights everywhere (their init zeroes attention outputs and makes temporal convs
    # the identity, which would hide mapping mistakes).
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = unets.from_make_a_video(reference.state_dict(), **config).eval()
    frames = 2 * ours.frame_multiple
    video = torch.randn(2, 3, frames, 8, 8)
    t = torch.tensor([5.0, 800.0]) if config.get("condition_on_timestep", True) else None
    with torch.no_grad():
        for x, kwargs in ((video, {}), (video[:, :, 0], {}), (video, {"enable_time": False})):
            expected = reference(x, t, **kwargs)
            torch.testing.assert_close(ours(x, t, **kwargs), expected, atol=1e-4, rtol=1e-4)


def test_mismatched_config_names_the_offending_weights():
    config = CONFIGS["pos-bias-time-compression"]
    state = make_a_video.SpaceTimeUnet(**config).state_dict()
    with pytest.raises(ValueError, match=r"unexpected weights.*spatial\.pos_bias"):
        unets.from_make_a_video(state, **dict(config, attn_pos_bias=False))
    with pytest.raises(ValueError, match=r"mismatched shapes.*attn\.to_q\.weight"):
        unets.from_make_a_video(state, **dict(config, attn_dim_head=4))
    del state["conv_out.spatial_conv.bias"]
    with pytest.raises(ValueError, match=r"missing weights \['conv_out\.spatial\.bias'\]"):
        unets.from_make_a_video(state, **config)
    with pytest.raises(TypeError, match="state_dict"):
        unets.from_make_a_video(make_a_video.SpaceTimeUnet(**config), **config)
