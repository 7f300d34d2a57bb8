"""The U-Net and block registries, and typed configs (unets/registry.py, blocks.py, config.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

import unets
from unets import ConfigPart, UnetConfig, UnetMixin
from unets.blocks import Conv3dBlock
from unets.space_time_unet import SpaceTimeBlocks, SpaceTimeUnet, SpaceTimeUnetConfig


def test_available_lists_builtin_unets_with_presets():
    names = unets.available()
    assert "space_time_unet" in names and "unet3d" in names
    assert names == sorted(names)
    assert {"debug", "small", "base"} <= set(unets.presets("space_time_unet"))


def test_build_by_name_preset_and_overrides():
    model = unets.build("space_time_unet", preset="debug", attn_heads=4)
    assert isinstance(model, SpaceTimeUnet)
    assert model.config.attn_heads == 4
    assert model.config.dim == unets.get("space_time_unet").preset_table["debug"]["dim"]
    # Without a preset the config class defaults apply; required fields must be given.
    plain = unets.build("space_time_unet", dim=8, dim_mult=(1,), self_attns=(False,),
                        temporal_compression=(False,), resnet_block_depths=(1,), attn_heads=1, attn_dim_head=4)
    assert plain.config.channels == 3
    with pytest.raises(ValueError, match=r"needs \['dim'\]"):
        unets.build("space_time_unet")


def test_build_from_config_dict_round_trips_through_json():
    model = unets.build("space_time_unet", preset="debug", blocks={"conv": "conv3d"}, attn_pos_bias="t5")
    data = json.loads(json.dumps(model.config.to_dict()))
    assert data["name"] == "space_time_unet"
    assert data["blocks"]["conv"] == "conv3d"
    again = unets.build(data)
    assert again.config == model.config
    assert isinstance(again.conv_in, Conv3dBlock)
    assert SpaceTimeUnetConfig.from_json(model.config.to_json()) == model.config
    # overrides apply on top of a dict too
    assert unets.build(data, attn_heads=1).config.attn_heads == 1


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: unets.build("space_time_unet", preset="debug", dim_mul=(1, 2)), r"did you mean 'dim_mult'"),
        (lambda: unets.build("space_tme_unet"), r"did you mean 'space_time_unet'"),
        (lambda: unets.build("space_time_unet", preset="debgu"), r"did you mean 'debug'.*available"),
        (lambda: unets.build({"dim": 8}), r"no 'name' entry"),
        (lambda: unets.build({**unets.build_config("space_time_unet", preset="debug").to_dict(), "atn_heads": 2}),
         r"did you mean 'attn_heads'"),
        (lambda: unets.build("space_time_unet", preset="debug", blocks={"conv": "pseudo3D"}),
         r"unknown conv block 'pseudo3D'.*did you mean 'pseudo3d'"),
        (lambda: unets.build("space_time_unet", preset="debug", blocks={"convv": "pseudo3d"}), r"did you mean 'conv'"),
        (lambda: unets.build("space_time_unet", preset="debug", dim_mult=(1, 2, 4)), r"one entry per level"),
        (lambda: unets.build("space_time_unet", preset="debug", attn_pos_bias="alibi"), r"one of \['continuous'"),
        (lambda: SpaceTimeUnetConfig.from_dict({"name": "unet3d", "dim": 8}), r"config is for U-Net 'unet3d'"),
    ],
)
def test_user_errors_name_the_valid_choices(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_valid_keys_are_listed_for_unknown_keys():
    with pytest.raises(ValueError) as info:
        SpaceTimeUnetConfig(dim=8).replace(heads=2)
    message = str(info.value)
    assert "'heads'" in message and "attn_heads" in message and "valid keys are" in message


def test_replace_merges_nested_parts():
    config = SpaceTimeUnetConfig(dim=8).replace(blocks={"conv": "conv3d"})
    assert config.blocks == SpaceTimeBlocks(conv="conv3d")
    assert config.replace(blocks=SpaceTimeBlocks()).blocks.conv == "pseudo3d"


# --- user-registered U-Nets and blocks ------------------------------------------------


@dataclasses.dataclass
class _TinyConfig(UnetConfig):
    unet_name: ClassVar[str] = ""
    channels: int = 3
    width: int = 4


class _TinyUnet(UnetMixin, nn.Module):
    config_class = _TinyConfig

    def __init__(self, channels: int = 3, width: int = 4):
        super().__init__()
        self.config = _TinyConfig(channels=channels, width=width)
        self.net = nn.Sequential(nn.Conv3d(channels, width, 1), nn.SiLU(), nn.Conv3d(width, channels, 1))

    frame_multiple = 1
    size_multiple = 1

    def forward(self, x: Tensor, t: Tensor | None = None, **kwargs) -> Tensor:
        return self.net(x)


def test_register_user_unet_builds_saves_and_loads(tmp_path):
    name = "test_tiny_unet"
    unets.register(name, _TinyUnet, _TinyConfig, {"debug": {"width": 2}}, overwrite=True)
    try:
        assert name in unets.available()
        model = unets.build(name, preset="debug")
        assert isinstance(model, _TinyUnet) and model.config.width == 2
        assert model.config.to_dict() == {"name": name, "channels": 3, "width": 2}
        model.save_pretrained(tmp_path)
        loaded = unets.load(tmp_path)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
        with pytest.raises(ValueError, match="already registered"):
            unets.register(name, _TinyUnet, _TinyConfig)
    finally:
        unets.registry._REGISTRY.pop(name, None)


def test_register_rejects_bad_entries():
    with pytest.raises(TypeError, match="UnetConfig subclass"):
        unets.register("test_bad", _TinyUnet, dict)
    with pytest.raises(ValueError, match="already named 'space_time_unet'"):
        unets.register("test_other_name", SpaceTimeUnet, SpaceTimeUnetConfig)
    assert "test_bad" not in unets.available() and "test_other_name" not in unets.available()


def test_register_block_is_used_by_config_name():
    built = []

    def plain_conv(dim_in, dim_out, kernel_size, *, temporal_kernel_size=None, causal_time=False):
        # A user's conv: per-frame 2D conv only (no mixing across frames).
        built.append((dim_in, dim_out, kernel_size))
        return Conv3dBlock(dim_in, dim_out, kernel_size, temporal_kernel_size=1)

    unets.register_block("conv", "test_plain", plain_conv, overwrite=True)
    try:
        assert "test_plain" in unets.available_blocks("conv")
        model = unets.build("space_time_unet", preset="debug", blocks={"conv": "test_plain"})
        assert built and (3, 8, 7) in built
        x = torch.randn(1, 3, 2, 4, 4)
        assert model(x, torch.tensor([1.0])).shape == x.shape
        with pytest.raises(ValueError, match="already registered"):
            unets.register_block("conv", "test_plain", plain_conv)
    finally:
        unets.blocks._BLOCKS["conv"].pop("test_plain", None)
    with pytest.raises(ValueError, match="did you mean 'attention'"):
        unets.register_block("atention", "x", plain_conv)


def test_config_parts_are_plain_json():
    @dataclasses.dataclass
    class Part(ConfigPart):
        sizes: tuple[int, ...] = (1, 2)
        kind: str = "a"

    part = Part.from_dict(json.loads(json.dumps(Part(sizes=(3, 4)).to_dict())))
    assert part == Part(sizes=(3, 4)) and isinstance(part.sizes, tuple)
