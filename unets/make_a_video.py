"""Load make-a-video-pytorch 0.4.0 `SpaceTimeUnet` checkpoints into `unets.SpaceTimeUnet`.

Our modules compute the same functions with parameters of the same sizes, under other names
(and 1x1x1 Conv3d kernels stored as Linear weights). `make_a_video_key` renames one key;
`convert_make_a_video_state_dict` renames and reshapes a whole state dict; `from_make_a_video`
builds the U-Net and loads it, raising with the offending names if anything is missing, left
over or mis-shaped. make-a-video's `Block` ignores its kernel-size arguments (always a 3x3 conv
with temporal kernel 3), which is exactly what our `ResnetBlock` does too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from unets.io import load_weights
from unets.space_time_unet import SpaceTimeUnet

__all__ = ["convert_make_a_video_state_dict", "from_make_a_video", "make_a_video_key"]


def _pos_bias_net(match: re.Match[str]) -> str:
    # make-a-video nests (Linear, SiLU) pairs, net.{k}.0 (and the last Linear as net.{L});
    # ours is one flat Sequential, so Linear k sits at index 2k.
    prefix, index = match.group(1), int(match.group(2))
    return f"{prefix}.pos_bias.net.{2 * index}."


_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    # U-Net skeleton: make-a-video's per-level ModuleList [init, blocks, attn, resample].
    (r"^to_timestep_cond\.1\.", "time_embed.proj."),
    (r"^(downs|ups)\.(\d+)\.0\.", r"\1.\2.init_block."),
    (r"^(downs|ups)\.(\d+)\.1\.", r"\1.\2.blocks."),
    (r"^(downs|ups)\.(\d+)\.2\.", r"\1.\2.attn."),
    (r"^(downs|ups)\.(\d+)\.3\.", r"\1.\2.sample."),
    # ResnetBlock and PseudoConv3d.
    (r"timestep_mlp\.1\.", "emb_proj."),
    (r"spatial_conv\.", "spatial."),
    (r"temporal_conv\.", "temporal."),
    # SpatioTemporalAttention, its position biases and feed-forward.
    (r"(spatial|temporal)_rel_pos_bias\.net\.(\d+)\.(?:0\.)?", _pos_bias_net),
    (r"spatial_attn\.", "spatial.attn."),
    (r"temporal_attn\.", "temporal.attn."),
    (r"ff\.proj_in\.0\.", "ff.proj_in.proj."),
    (r"ff\.proj_out\.0\.", "ff.norm."),
    (r"ff\.proj_out\.1\.", "ff.proj_out."),
    # Downsample / Upsample (their Sequentials held a Rearrange or a conv first).
    (r"down_space\.1\.", "down_space."),
    (r"down_time\.1\.", "down_time."),
    (r"up_space\.0\.", "up_space."),
    (r"up_time\.0\.", "up_time."),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def make_a_video_key(key: str) -> str:
    """Our state-dict name for make-a-video-pytorch's `key`."""
    for pattern, replacement in _COMPILED:
        key = pattern.sub(replacement, key)
    return key


def convert_make_a_video_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """Rename make-a-video's keys to ours and reshape 1x1(x1) conv kernels to the Linear
    weights `model` holds (same number of elements). Keys that do not map onto `model` are
    kept under their new name, so `load_weights` can report them."""
    ours = model.state_dict()
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = make_a_video_key(key)
        if new in converted:
            raise ValueError(f"make-a-video keys collide on {new!r} (second one: {key!r})")
        target = ours.get(new)
        if target is not None and value.shape != target.shape and value.numel() == target.numel():
            value = value.reshape(target.shape)
        converted[new] = value
    return converted


def from_make_a_video(state_dict: Mapping[str, Tensor], **config: Any) -> SpaceTimeUnet:
    """A `SpaceTimeUnet` built with `config` (make-a-video-pytorch's constructor arguments,
    e.g. `dim=64, dim_mult=(1, 2, 4, 8)`) holding the weights of make-a-video-pytorch's
    `SpaceTimeUnet.state_dict()`; it returns the same outputs as the original.

    Raises `ValueError` naming every missing, unexpected or mis-shaped weight (usually a sign
    that `config` differs from the checkpoint's)."""
    if isinstance(state_dict, nn.Module):
        raise TypeError("from_make_a_video expects a state dict; pass make_a_video_unet.state_dict()")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_make_a_video expects a state dict (mapping), got {type(state_dict).__name__}")
    if config.get("cond_dim") is not None:
        raise ValueError("make-a-video checkpoints have no text conditioning; leave cond_dim=None")
    model = SpaceTimeUnet(**config)
    try:
        load_weights(model, convert_make_a_video_state_dict(state_dict, model))
    except ValueError as error:
        raise ValueError(
            f"{error}. Names are ours after renaming from make-a-video's; check that the config "
            f"({config}) matches the checkpoint's"
        ) from None
    return model
