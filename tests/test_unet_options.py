"""U-Net options are declared once, by the config dataclass: the constructor's signature, its
defaults, positional parameters and argument checking all derive from it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unets import SpaceTimeUnet, SpaceTimeUnetConfig, Unet3D, Unet3DConfig

torch.set_num_threads(1)


@pytest.mark.parametrize(("model", "config"), [(SpaceTimeUnet, SpaceTimeUnetConfig), (Unet3D, Unet3DConfig)])
def test_signature_lists_every_option_with_its_default(model, config):
    params = inspect.signature(model).parameters
    fields = dataclasses.fields(config)
    assert list(params) == [f.name for f in fields]
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default, f.name
    assert params["dim"].default is inspect.Parameter.empty


def test_seed_library_parameter_kinds():
    # make-a-video-pytorch: every option keyword-only.
    st_params = inspect.signature(SpaceTimeUnet).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in st_params)
    # video-diffusion-pytorch: dim ... resnet_groups positional, in its order.
    positional = [p.name for p in inspect.signature(Unet3D).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["dim", "cond_dim", "out_dim", "dim_mults", "channels", "attn_heads", "attn_dim_head",
                          "use_bert_text_cond", "init_dim", "init_kernel_size", "use_sparse_linear_attn",
                          "block_type", "resnet_groups"]


def test_positional_and_keyword_calls_build_the_same_config():
    by_position = Unet3D(8, None, None, [1, 2], 3, 2, 4, False, None, 3, True, "resnet", 4)
    by_name = Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=4, init_kernel_size=3, resnet_groups=4)
    assert by_position.config == by_name.config
    assert by_name.config.dim_mults == (1, 2)


def test_bad_calls_name_the_model_and_the_option():
    with pytest.raises(TypeError, match=r"SpaceTimeUnet\(\) got an unexpected keyword argument 'dim_mults'.*'dim_mult'"):
        SpaceTimeUnet(dim=8, dim_mults=(1,))
    with pytest.raises(TypeError, match=r"SpaceTimeUnet\(\): too many positional arguments"):
        SpaceTimeUnet(8)
    with pytest.raises(TypeError, match=r"Unet3D\(\): missing a required argument: 'dim'"):
        Unet3D()
    with pytest.raises(TypeError, match=r"Unet3D\(\).*multiple values.*'dim'"):
        Unet3D(8, dim=8)


def test_blocks_option_takes_a_dict_or_none():
    from unets.space_time_unet import PRESETS

    base = PRESETS["debug"]
    default = SpaceTimeUnet(**base, blocks=None)
    assert default.config.blocks == SpaceTimeUnetConfig(**base).blocks
    assert SpaceTimeUnet(**base, blocks={"conv": "conv3d"}).config.blocks.conv == "conv3d"


@settings(max_examples=10, deadline=None)
@given(levels=st.integers(1, 3), as_kind=st.sampled_from([list, tuple, iter]))
def test_sequences_of_any_kind_become_tuples(levels, as_kind):
    mults = [1, 2, 2][:levels]
    net = Unet3D(dim=8, dim_mults=as_kind(mults), attn_heads=2, attn_dim_head=4, resnet_groups=4,
                 init_kernel_size=3)
    assert net.config.dim_mults == tuple(mults)
    assert Unet3D.from_config(net.config.to_dict()).config == net.config
