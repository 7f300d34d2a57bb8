"""Where diffusers' video U-Nets meet this library: `from_diffusers` and `save_diffusers`.

    model = unets.from_diffusers("zeroscope/unet")                      # UNet3DConditionModel
    model = unets.from_diffusers(sd_unet, motion_adapter="mm_sd_v15_v2")  # AnimateDiff
    model.save_diffusers("out/unet")     # ModelScope: a UNet3DConditionModel folder
    model.save_diffusers("out/adapter")  # AnimateDiff: a MotionAdapter folder

`ModelScopeUnet` and `AnimateDiffUnet` use diffusers' parameter names, so the weights move
unchanged; what is converted here is the config (one table per class below) and the folder
layout (`config.json` with `_class_name`, `diffusion_pytorch_model.safetensors`). Reading a
folder needs no diffusers install: files are read as regular files under a size limit,
weights only through safetensors or `torch.load(weights_only=True)`. Options this library
does not implement (SDXL's added embeddings, LCM's `time_cond_proj_dim`, ...) raise naming
the key and its value rather than being dropped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unets.guards import BadFileError, read_json, regular_file
from unets.io import _write_atomic, check_model_size, load_weights

__all__ = ["from_diffusers", "read_diffusers_folder", "save_diffusers"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 64 << 30

UNET3D = "UNet3DConditionModel"
UNET2D = "UNet2DConditionModel"
UNET_MOTION = "UNetMotionModel"
ADAPTER = "MotionAdapter"
ACCEPTED = (UNET3D, UNET_MOTION, f"{UNET2D} with motion_adapter={ADAPTER}")

# Written into saved configs; diffusers only warns when it differs from the installed one.
DIFFUSERS_VERSION = "0.42.0"

# Options of the diffusers classes this library does not implement, with the only value
# accepted (their defaults). Keys not listed are either mapped below or have no effect on
# fp32 outputs (`upcast_attention`, `_name_or_path`).
_DEFAULTS_ONLY: dict[str, Any] = {
    "act_fn": "silu",
    "time_cond_proj_dim": None,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dropout": 0.0,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "temporal_transformer_layers_per_block": 1,
    "reverse_temporal_transformer_layers_per_block": None,
    "transformer_layers_per_mid_block": None,
    "temporal_transformer_layers_per_mid_block": 1,
    "reverse_motion_num_attention_heads": None,
    "mid_block_layers": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "motion_transformer_layers_per_block": 1,
    "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1,
    "conv_in_channels": None,
}


# --------------------------------------------------------------------------------------------
# reading


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _check_defaults(config: Mapping[str, Any], what: str) -> None:
    for key, allowed in _DEFAULTS_ONLY.items():
        if key not in config:
            continue
        value = config[key]
        # Per-level tuples of the default (e.g. transformer_layers_per_block=[1, 1, 1, 1]) are fine.
        if isinstance(value, (list, tuple)) and not isinstance(allowed, (list, tuple)) and value:
            if all(_same(v, allowed) for v in value):
                continue
        if not _same(value, allowed):
            raise ValueError(f"{what}: {key}={value!r} is not supported by this library "
                             f"(only {allowed!r}); supported classes: {list(ACCEPTED)}")


def _single(config: Mapping[str, Any], key: str, what: str) -> Any:
    """A per-level option given as one value or as a list of equal values."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(map(json.dumps, value))) != 1:
            raise ValueError(f"{what}: {key}={list(value)!r} varies per level; this library supports one value")
        return value[0]
    return value


def _heads(config: Mapping[str, Any], what: str) -> int:
    # UNet2DConditionModel: `attention_head_dim` is the head count unless num_attention_heads is set.
    key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    return int(_single(config, key, what))


def _common(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    sample_size = config.get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return {
        "channels": int(config.get("in_channels", 4)),
        "out_channels": int(config.get("out_channels", 4)),
        "block_out_channels": tuple(int(w) for w in config["block_out_channels"]),
        "layers_per_block": int(_single(config, "layers_per_block", what)),
        "downsample_padding": int(config.get("downsample_padding", 1)),
        "mid_block_scale_factor": config.get("mid_block_scale_factor", 1.0),
        "norm_num_groups": int(config.get("norm_num_groups") or 32),
        "norm_eps": config.get("norm_eps", 1e-5),
        "cond_dim": int(_single(config, "cross_attention_dim", what)),
        "sample_size": sample_size,
    }


def _modelscope_options(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    _check_defaults(config, what)
    if config.get("num_attention_heads") is not None:  # diffusers itself refuses it for this class
        raise ValueError(f"{what}: num_attention_heads={config['num_attention_heads']!r} is not supported "
                         f"(only None; the head width is attention_head_dim)")
    return {
        **_common(config, what),
        "down_block_types": tuple(config["down_block_types"]),
        "up_block_types": tuple(config["up_block_types"]),
        "attention_head_dim": int(_single(config, "attention_head_dim", what)),
    }


def _motion_types(types: Any, kind: str) -> tuple[str, ...]:
    return tuple(f"CrossAttn{kind}BlockMotion" if "CrossAttn" in t else f"{kind}BlockMotion" for t in types)


def _animatediff_options(unet: Mapping[str, Any], adapter: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    _check_defaults(unet, what)
    options = {
        **_common(unet, what),
        "down_block_types": _motion_types(unet["down_block_types"], "Down"),
        "up_block_types": _motion_types(unet["up_block_types"], "Up"),
        "num_attention_heads": _heads(unet, what),
        "use_linear_projection": bool(unet.get("use_linear_projection", False)),
    }
    motion = unet if adapter is None else adapter
    if adapter is not None:
        _check_defaults(adapter, f"{what} (motion adapter)")
        if list(adapter["block_out_channels"]) != list(options["block_out_channels"]):
            raise ValueError(f"{what}: the motion adapter's block_out_channels {list(adapter['block_out_channels'])} "
                             f"differ from the U-Net's {list(options['block_out_channels'])}")
        layers = int(_single(adapter, "motion_layers_per_block", what))
        if layers != options["layers_per_block"]:
            raise ValueError(f"{what}: the motion adapter has {layers} layers per block, the U-Net "
                             f"{options['layers_per_block']}")
        # None: an original AnimateDiff file, which stores no group count and uses the U-Net's.
        groups = int(adapter.get("motion_norm_num_groups") or options["norm_num_groups"])
        if groups != options["norm_num_groups"]:
            raise ValueError(f"{what}: motion_norm_num_groups={groups} differs from the U-Net's norm_num_groups="
                             f"{options['norm_num_groups']}; this library uses one group count")
    options["motion_num_attention_heads"] = int(_single(motion, "motion_num_attention_heads", what))
    options["motion_max_seq_length"] = int(motion.get("motion_max_seq_length", 32))
    options["use_motion_mid_block"] = bool(motion.get("use_motion_mid_block", True))
    return options


def _class_of(config: Mapping[str, Any]) -> str | None:
    name = config.get("_class_name")
    return name if isinstance(name, str) else None


def read_diffusers_folder(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """`(class name, config, state dict)` of a diffusers model folder (or of the `unet/`
    folder of a pipeline folder), read without diffusers: `config.json` and
    `diffusion_pytorch_model.safetensors` (or `.bin`, through `torch.load(weights_only=True)`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder holding a diffusers model")
    if not (folder / CONFIG_NAME).exists() and (folder / "unet" / CONFIG_NAME).exists():
        folder = folder / "unet"  # a pipeline folder
    config = read_json(folder / CONFIG_NAME, what="diffusers config", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise BadFileError(f"diffusers config in {str(folder)!r} must hold a JSON object, got {type(config).__name__}")
    name = _class_of(config)
    if name is None:
        raise ValueError(f"{str(folder / CONFIG_NAME)!r} names no diffusers class (_class_name); "
                         f"accepted: {list(ACCEPTED)}")
    if (folder / SAFETENSORS_NAME).exists() or (folder / SAFETENSORS_NAME).is_symlink():
        weights = regular_file(folder / SAFETENSORS_NAME, what="diffusers weights", max_bytes=MAX_WEIGHTS_BYTES)
        try:
            state = load_file(str(weights))
        except Exception as err:  # SafetensorError, or OSError from a file cut short under mmap
            raise BadFileError(
                f"diffusers weights {str(weights)!r} are not a readable safetensors file: {err}"
            ) from None
    elif (folder / BIN_NAME).exists() or (folder / BIN_NAME).is_symlink():
        weights = regular_file(folder / BIN_NAME, what="diffusers weights", max_bytes=MAX_WEIGHTS_BYTES)
        state = _torch_load(weights)
    else:
        raise FileNotFoundError(f"{str(folder)!r} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")
    return name, config, state


def _torch_load(path: Path) -> dict[str, Tensor]:
    """A pickled state dict, read with `weights_only=True` (no code runs)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise BadFileError(f"{str(path)!r} is not a readable weights-only torch file: {err}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BadFileError(f"{str(path)!r} does not hold a state dict of tensors")
    return dict(state)


def _read(source: Any, what: str) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        return _read_original(Path(source), what)
    if isinstance(source, (str, os.PathLike)):
        return read_diffusers_folder(source)
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        names = [cls.__name__ for cls in type(source).__mro__]
        known = [n for n in names if n in (UNET3D, UNET2D, UNET_MOTION, ADAPTER)]
        name = known[0] if known else type(source).__name__
        return name, dict(source.config), dict(source.state_dict())
    raise TypeError(f"{what} must be a diffusers model or the path of a local folder holding one, "
                    f"got {type(source).__name__}")


def _read_original(path: Path, what: str) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """A file as the original releases ship them: AnimateDiff's motion modules (given as
    `motion_adapter`) or ModelScope's `text2video_pytorch_model.pth` (given as `source`,
    with the `damo-vilab/text-to-video-ms-1.7b` config, which every release shares)."""
    from unets.modelscope import ModelScopeUnetConfig
    from unets.original_keys import from_animatediff_original, from_modelscope_original, read_state_dict

    state = read_state_dict(path)
    if what == "motion_adapter":
        state, config = from_animatediff_original(state)
        return ADAPTER, config, state
    config = ModelScopeUnetConfig()
    return UNET3D, {"_class_name": UNET3D, **_unet3d_config(config)}, from_modelscope_original(state, config)


def from_diffusers(source: Any, *, motion_adapter: Any = None) -> nn.Module:
    """This library's model for a diffusers video U-Net (module doc). `source`: a
    `UNet3DConditionModel` or `UNetMotionModel` (instance or folder), or a
    `UNet2DConditionModel` with `motion_adapter` a `MotionAdapter` (instance or folder).
    The original files work too: ModelScope's `text2video_pytorch_model.pth` as `source`,
    an AnimateDiff `mm_sd_v15*.ckpt` / `.safetensors` as `motion_adapter`.
    The result's `forward(x, t, cond=tokens)` equals the diffusers model's `.sample`."""
    from unets.animatediff import AnimateDiffUnet
    from unets.modelscope import ModelScopeUnet

    name, config, state = _read(source, "source")
    what = f"{name} {str(source)!r}" if isinstance(source, (str, os.PathLike)) else name
    if name == ADAPTER:
        raise ValueError(f"source is a {ADAPTER}: pass the image U-Net ({UNET2D}) as source and the adapter "
                         f"as motion_adapter=")
    if motion_adapter is not None and name != UNET2D:
        raise ValueError(f"motion_adapter= goes with a {UNET2D} source, got a {name}; accepted: {list(ACCEPTED)}")
    if name == UNET3D:
        model_cls, options = ModelScopeUnet, _modelscope_options(config, what)
    elif name == UNET_MOTION:
        model_cls, options = AnimateDiffUnet, _animatediff_options(config, None, what)
    elif name == UNET2D:
        if motion_adapter is None:
            raise ValueError(f"a {UNET2D} is an image U-Net: pass its motion_adapter= ({ADAPTER}) to make it "
                             f"AnimateDiff; accepted: {list(ACCEPTED)}")
        adapter_name, adapter_config, adapter_state = _read(motion_adapter, "motion_adapter")
        if adapter_name != ADAPTER:
            raise ValueError(f"motion_adapter holds a {adapter_name}; accepted: {ADAPTER}")
        model_cls = AnimateDiffUnet
        options = _animatediff_options(config, adapter_config, what)
        # The U-Net's and the adapter's keys are disjoint and together make UNetMotionModel's.
        overlap = sorted(set(state) & set(adapter_state))
        if overlap:
            raise ValueError(f"the motion adapter's weights overlap the U-Net's: {overlap[:5]}")
        state = {**state, **adapter_state}
    else:
        raise ValueError(f"source holds a {name}; accepted: {list(ACCEPTED)}")
    config_obj = model_cls.config_class(**options)
    check_model_size(config_obj, what=what)
    # Keys and shapes are checked on the meta device first, so a wrong file fails before
    # gigabytes are allocated.
    with torch.device("meta"):
        probe = model_cls(**options)
    if isinstance(probe, AnimateDiffUnet):
        state = _with_positions(probe, state)
    # Tensors read from files are nobody else's: the probe takes them as they are (mapped
    # from a safetensors file, like diffusers' from_pretrained; `load_weights`) and becomes
    # the model, so no randomly initialised copy is ever allocated. A model passed in keeps
    # its own: the probe only checks the keys (copying into meta tensors is a no-op) and ours
    # gets copies.
    from_files = all(isinstance(s, (str, os.PathLike)) for s in (source, motion_adapter) if s is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load_weights(probe, state, assign=from_files)
    if from_files and not any(t.is_meta for t in itertools.chain(probe.parameters(), probe.buffers())):
        return probe
    model = model_cls(**options)
    load_weights(model, state)
    return model


def _with_positions(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Motion-module checkpoints may leave out the fixed frame positions (`pos_embed.pe`,
    not learned) or carry them for another length: use the model's own, after checking that
    what a file carries is the same sinusoids."""
    from unets.diffusers_layers import FramePositions

    out = dict(state)
    for key, value in model.state_dict().items():  # `model` may live on the meta device
        if key.endswith("pos_embed.pe"):
            own = FramePositions(value.shape[-1], value.shape[1]).pe
            given = out.get(key)
            if given is not None and given.ndim == 3 and given.shape[-1] == own.shape[-1]:
                n = min(given.shape[1], own.shape[1])
                if not torch.allclose(given[:, :n].float(), own[:, :n], atol=1e-4):
                    raise ValueError(f"{key} holds frame positions that are not the standard sinusoids")
            out[key] = own
    return out


# --------------------------------------------------------------------------------------------
# writing


def _base_config(c: Any) -> dict[str, Any]:
    return {
        "sample_size": c.sample_size,
        "in_channels": c.channels,
        "out_channels": c.out_channels or c.channels,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "downsample_padding": c.downsample_padding,
        "mid_block_scale_factor": c.mid_block_scale_factor,
        "act_fn": "silu",
        "norm_num_groups": c.norm_num_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": c.cond_dim,
    }


def _unet3d_config(c: Any) -> dict[str, Any]:
    return {**_base_config(c), "down_block_types": list(c.down_block_types), "up_block_types": list(c.up_block_types),
            "attention_head_dim": c.attention_head_dim, "num_attention_heads": None, "time_cond_proj_dim": None}


def _plain_types(types: tuple[str, ...]) -> list[str]:
    return [t.replace("Motion", "2D") for t in types]


def _unet2d_config(c: Any) -> dict[str, Any]:
    return {**_base_config(c), "down_block_types": _plain_types(c.down_block_types),
            "up_block_types": _plain_types(c.up_block_types), "attention_head_dim": c.num_attention_heads,
            "use_linear_projection": c.use_linear_projection}


def _adapter_config(c: Any) -> dict[str, Any]:
    return {"block_out_channels": list(c.block_out_channels), "motion_layers_per_block": c.layers_per_block,
            "motion_transformer_layers_per_block": 1, "motion_mid_block_layers_per_block": 1,
            "motion_transformer_layers_per_mid_block": 1, "motion_num_attention_heads": c.motion_num_attention_heads,
            "motion_norm_num_groups": c.norm_num_groups, "motion_max_seq_length": c.motion_max_seq_length,
            "use_motion_mid_block": c.use_motion_mid_block, "conv_in_channels": None}


def _motion_config(c: Any) -> dict[str, Any]:
    return {**_base_config(c), "down_block_types": list(c.down_block_types), "up_block_types": list(c.up_block_types),
            "num_attention_heads": c.num_attention_heads, "use_linear_projection": c.use_linear_projection,
            "motion_num_attention_heads": c.motion_num_attention_heads,
            "motion_max_seq_length": c.motion_max_seq_length, "use_motion_mid_block": c.use_motion_mid_block}


PARTS = ("motion_adapter", "unet", "unet_motion")


def save_diffusers(model: nn.Module, path: str | os.PathLike, *, part: str | None = None) -> Path:
    """Write `model` as a diffusers model folder at `path` (created); returns it.

    `ModelScopeUnet`: a `UNet3DConditionModel` folder. `AnimateDiffUnet`: by default a
    `MotionAdapter` folder (the motion modules: what temporal-only training changed);
    `part="unet"` the `UNet2DConditionModel` (the SD U-Net), `part="unet_motion"` the whole
    `UNetMotionModel`."""
    from unets.animatediff import AnimateDiffUnet
    from unets.modelscope import ModelScopeUnet

    c = model.config  # type: ignore[attr-defined]
    extra = [name for name in ("frame_cond", "frame_rate_cond", "lowres_cond", "self_cond") if getattr(c, name, False)]
    if extra:
        raise ValueError(f"a model with {' / '.join(extra)} has inputs no diffusers class takes; "
                         "save_diffusers needs frame_cond, frame_rate_cond, lowres_cond and self_cond all False")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if isinstance(model, ModelScopeUnet):
        if part not in (None, "unet"):
            raise ValueError(f"part={part!r}: a ModelScopeUnet is saved whole (part=None or 'unet')")
        name, config = UNET3D, _unet3d_config(c)
    elif isinstance(model, AnimateDiffUnet):
        part = part or "motion_adapter"
        if part not in PARTS:
            raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}")
        motion = {k for k in state if ".motion_modules." in k}
        if part == "motion_adapter":
            name, config = ADAPTER, _adapter_config(c)
            state = {k: v for k, v in state.items() if k in motion}
        elif part == "unet":
            name, config = UNET2D, _unet2d_config(c)
            state = {k: v for k, v in state.items() if k not in motion}
        else:
            name, config = UNET_MOTION, _motion_config(c)
    else:
        raise TypeError(f"save_diffusers writes ModelScopeUnet and AnimateDiffUnet models, got {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **config}, indent=2)
    # Written beside and renamed into place: a model loaded from this very folder maps its
    # weights from the old file (from_diffusers), which must stay whole while it lives.
    _write_atomic(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    _write_atomic(folder / SAFETENSORS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return folder
