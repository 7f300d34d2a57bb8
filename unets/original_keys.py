"""Key maps between this library's (= diffusers') names and the files people download:

- ModelScope's `text2video_pytorch_model.pth`: LDM-style keys (`input_blocks.N.M`,
  `middle_block`, `output_blocks`, resnets as `in_layers` / `emb_layers` / `out_layers`, the
  temporal conv stack under the resnet as `temopral_conv` (sic), temporal transformers
  projecting with 1-D convs);
- AnimateDiff's motion modules `mm_sd_v15*.ckpt`: diffusers' `MotionAdapter` names with
  `temporal_transformer.`, `attention_blocks.N`, `norms.N`, `ff_norm` and a fixed
  `pos_encoder.pe` per attention.

Both directions are given, so a model fine-tuned here can be written back in the original
layout. The files are read only through safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from unets.guards import BadFileError, regular_file

__all__ = [
    "from_animatediff_original",
    "from_modelscope_original",
    "read_state_dict",
    "to_animatediff_original",
    "to_modelscope_original",
]

MAX_WEIGHTS_BYTES = 64 << 30

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file, or of a pickled checkpoint read with
    `torch.load(weights_only=True)` (a `{"state_dict": ...}` wrapper is unwrapped)."""
    path = regular_file(Path(path), what="checkpoint", max_bytes=MAX_WEIGHTS_BYTES)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise BadFileError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise BadFileError(f"{str(path)!r} is not a readable weights-only torch file: {err}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BadFileError(f"{str(path)!r} does not hold a state dict of tensors")
    return dict(state)


# --------------------------------------------------------------------------------------------
# ModelScope


def _modelscope_prefixes(config: Any) -> list[tuple[str, str, str]]:
    """(our prefix, LDM prefix, kind) for every module; kind is "resnet", "temporal" (1-D conv
    projections in the original) or "same" (identical names below the prefix)."""
    rows = [("conv_in", "input_blocks.0.0", "same"), ("transformer_in", "input_blocks.0.1", "temporal"),
            ("time_embedding.linear_1", "time_embed.0", "same"), ("time_embedding.linear_2", "time_embed.2", "same"),
            ("conv_norm_out", "out.0", "same"), ("conv_out", "out.2", "same")]
    layers, levels = config.layers_per_block, len(config.block_out_channels)

    def layer(block: str, j: int, ldm: str, cross: bool) -> None:
        rows.append((f"{block}.resnets.{j}", f"{ldm}.0", "resnet"))
        rows.append((f"{block}.temp_convs.{j}", f"{ldm}.0.temopral_conv", "same"))
        if cross:
            rows.append((f"{block}.attentions.{j}", f"{ldm}.1", "same"))
            rows.append((f"{block}.temp_attentions.{j}", f"{ldm}.2", "temporal"))

    i = 1
    for b, kind in enumerate(config.down_block_types):
        for j in range(layers):
            layer(f"down_blocks.{b}", j, f"input_blocks.{i}", kind.startswith("CrossAttn"))
            i += 1
        if b < levels - 1:
            rows.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{i}.op", "same"))
            i += 1
    rows += [("mid_block.resnets.0", "middle_block.0", "resnet"),
             ("mid_block.temp_convs.0", "middle_block.0.temopral_conv", "same"),
             ("mid_block.attentions.0", "middle_block.1", "same"),
             ("mid_block.temp_attentions.0", "middle_block.2", "temporal"),
             ("mid_block.resnets.1", "middle_block.3", "resnet"),
             ("mid_block.temp_convs.1", "middle_block.3.temopral_conv", "same")]
    i = 0
    for b, kind in enumerate(config.up_block_types):
        cross = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            layer(f"up_blocks.{b}", j, f"output_blocks.{i}", cross)
            if j == layers and b < levels - 1:
                rows.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{i}.{3 if cross else 1}.conv", "same"))
            i += 1
    return rows


def _split(key: str, rows: list[tuple[str, str, str]], column: int) -> tuple[tuple[str, str, str], str]:
    best = None
    for row in rows:
        prefix = row[column]
        if key.startswith(prefix + ".") and (best is None or len(prefix) > len(best[column])):
            best = row
    if best is None:
        raise ValueError(f"unexpected key {key!r}: no module of this config holds it")
    return best, key[len(best[column]) + 1:]


def _is_conv1d_proj(rest: str) -> bool:
    return rest in ("proj_in.weight", "proj_out.weight")


def to_modelscope_original(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """Our / diffusers' `UNet3DConditionModel` state dict in the layout of ModelScope's
    `text2video_pytorch_model.pth` (`config`: a `ModelScopeUnetConfig`)."""
    rows = _modelscope_prefixes(config)
    out = {}
    for key, value in state.items():
        (ours, ldm, kind), rest = _split(key, rows, 0)
        if kind == "resnet":
            head, _, tail = rest.partition(".")
            rest = f"{_RESNET[head]}.{tail}"
        elif kind == "temporal" and _is_conv1d_proj(rest):
            value = value[:, :, None]
        out[f"{ldm}.{rest}"] = value
    return out


def from_modelscope_original(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """The inverse of `to_modelscope_original`: a ModelScope checkpoint's tensors under our
    names. Unknown keys raise naming them; missing ones are reported when loading."""
    rows = _modelscope_prefixes(config)
    out = {}
    unknown = []
    for key, value in state.items():
        key = key.removeprefix("model.diffusion_model.")
        try:
            (ours, ldm, kind), rest = _split(key, rows, 1)
        except ValueError:
            unknown.append(key)
            continue
        if kind == "resnet":
            head = ".".join(rest.split(".")[:2]) if rest.split(".")[0] != "skip_connection" else "skip_connection"
            if head not in _RESNET_BACK:
                unknown.append(key)
                continue
            rest = f"{_RESNET_BACK[head]}{rest[len(head):]}"
        elif kind == "temporal" and _is_conv1d_proj(rest) and value.ndim == 3:
            value = value[:, :, 0]
        out[f"{ours}.{rest}"] = value
    if unknown:
        raise ValueError(f"unexpected keys in the ModelScope checkpoint (none of this config's modules): "
                         f"{sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}")
    return out


# --------------------------------------------------------------------------------------------
# AnimateDiff

_MOTION = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.(.*)$")
_BLOCK_NAMES = (("norm1", "norms.0"), ("norm2", "norms.1"), ("norm3", "ff_norm"),
                ("attn1", "attention_blocks.0"), ("attn2", "attention_blocks.1"))


def to_animatediff_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Motion-module tensors (our / `MotionAdapter` names; other keys are left out) in the
    layout of AnimateDiff's `mm_sd_v15*.ckpt`, frame positions included."""
    out = {}
    for key, value in state.items():
        match = _MOTION.match(key)
        if match is None:
            continue
        block, index, rest = match.groups()
        prefix = f"{block}.motion_modules.{index}.temporal_transformer"
        inner = re.match(r"^transformer_blocks\.(\d+)\.pos_embed\.pe$", rest)
        if inner is not None:
            for attn in (0, 1):  # one copy per attention, as in the original (not shared memory)
                name = f"{prefix}.transformer_blocks.{inner.group(1)}.attention_blocks.{attn}.pos_encoder.pe"
                out[name] = value.clone()
            continue
        for ours, theirs in _BLOCK_NAMES:
            rest = re.sub(rf"^(transformer_blocks\.\d+)\.{ours}\.", rf"\1.{theirs}.", rest)
        out[f"{prefix}.{rest}"] = value
    return out


def from_animatediff_original(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`(tensors under MotionAdapter names, MotionAdapter config)` of an AnimateDiff
    motion-module checkpoint. The config is read off the shapes: widths from each level's
    first `proj_in`, layers per level, whether there is a mid-block module, and the frame
    count its positions cover. Neither the head count nor the group count is stored: 8 heads,
    as in every release, and the U-Net's own group count (`from_diffusers` fills it in)."""
    out: dict[str, Tensor] = {}
    positions = 32
    unknown = []
    for key, value in state.items():
        original = key
        key = key.replace(".temporal_transformer.", ".")
        match = _MOTION.match(key)
        if match is None:
            unknown.append(original)
            continue
        if ".pos_encoder.pe" in key:
            positions = int(value.shape[1])
            key = re.sub(r"\.attention_blocks\.\d+\.pos_encoder\.pe$", ".pos_embed.pe", key)
        else:
            for ours, theirs in _BLOCK_NAMES:
                key = key.replace(f".{theirs}.", f".{ours}.")
        out[key] = value
    if unknown:
        raise ValueError(f"unexpected keys in the motion-module checkpoint (not motion modules): "
                         f"{sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}")
    widths = []
    level = 0
    while f"down_blocks.{level}.motion_modules.0.proj_in.weight" in out:
        widths.append(int(out[f"down_blocks.{level}.motion_modules.0.proj_in.weight"].shape[1]))
        level += 1
    if not widths:
        raise ValueError("the checkpoint holds no down_blocks.0.motion_modules.0 weights: not an AnimateDiff "
                         "motion-module file")
    layers = len({k.split(".")[3] for k in out if k.startswith("down_blocks.0.motion_modules.")})
    config = {"_class_name": "MotionAdapter", "block_out_channels": widths, "motion_layers_per_block": layers,
              "motion_num_attention_heads": 8, "motion_norm_num_groups": None, "motion_max_seq_length": positions,
              "use_motion_mid_block": any(k.startswith("mid_block.") for k in out)}
    return out, config
