"""Every registered U-Net: one `attn_backend` spelling with the library's precedence, and a
`cond_format` derived from its config."""

from __future__ import annotations

import pytest
import torch

import unets
from spacetime import attention_backend
from unets import SpaceTimeUnet, Unet3D


def small_space_time(**options):
    return unets.build("space_time_unet", preset="debug", **options)


def test_cond_format_of_each_unet():
    assert small_space_time().cond_format is None
    assert small_space_time(cond_dim=8).cond_format == "tokens"
    assert Unet3D(dim=8, dim_mults=(1, 2)).cond_format is None
    assert Unet3D(dim=8, dim_mults=(1, 2), cond_dim=8).cond_format == "pooled"
    assert Unet3D(dim=8, dim_mults=(1, 2), cond_dim=8, text_cross_attn=True).cond_format == "tokens"
    assert Unet3D(dim=8, dim_mults=(1, 2), use_bert_text_cond=True).cond_format == "pooled"


def test_cond_on_tokens_is_a_read_only_alias():
    model = small_space_time(cond_dim=8)
    assert model.cond_on_tokens is True
    assert Unet3D(dim=8, dim_mults=(1, 2), cond_dim=8).cond_on_tokens is False
    with pytest.raises(AttributeError):
        model.cond_on_tokens = False


@pytest.mark.parametrize("name", ["space_time_unet", "unet3d"])
def test_attn_backend_pins_and_none_follows_the_context(name):
    video = torch.randn(1, 3, 4, 8, 8)
    t = torch.zeros(1, dtype=torch.long)
    follows = unets.build(name, preset="debug")
    assert follows.config.attn_backend is None
    follows(video, t)  # auto
    with attention_backend("flash"), pytest.raises(ValueError, match="backend 'flash' cannot run"):
        follows(video, t)  # the context decides: flash cannot run fp32 on CPU
    pinned = unets.build(name, preset="debug", attn_backend="math")
    with attention_backend("flash"):
        pinned(video, t)  # an explicit backend wins over the context
    assert unets.build(pinned.config.to_dict()).config.attn_backend == "math"


def test_flash_attn_no_longer_overrides_the_context():
    model = SpaceTimeUnet(dim=8, dim_mult=(1, 2), self_attns=(False, True), temporal_compression=(False, False),
                          resnet_block_depths=(1, 1), attn_heads=2, attn_dim_head=4, flash_attn=True,
                          condition_on_timestep=False)
    video = torch.randn(1, 3, 2, 8, 8)
    model(video)
    with attention_backend("flash"), pytest.raises(ValueError, match="backend 'flash' cannot run"):
        model(video)


def test_unknown_attn_backend_is_refused_with_the_names():
    with pytest.raises(ValueError, match="attn_backend must be one of .*'math'.*got 'mathh'"):
        small_space_time(attn_backend="mathh")
