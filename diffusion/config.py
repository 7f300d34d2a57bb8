"""Run configuration for the command line: a YAML/JSON file with sections, validated up front.

The layout mirrors text2video-from-scratch's `default.yaml`:

    unet: space_time_unet          # registry name (unets.available())
    preset: debug                  # optional U-Net preset (unets.presets(name))
    model: {dim: 32, ...}          # U-Net config fields, over the preset
    diffusion: {image_size: 16, num_frames: 8, channels: 1, objective: v, ...}
                                   # GaussianDiffusion keywords, plus cond_on_tokens
    trainer: {train_num_steps: 1000, max_seconds: 600, ...}  # Trainer keywords
    data: {kind: moving-digits, num_videos: 4000, ...}       # or {kind: folder, folder: DIR}
    sample: {sampler: ddim, steps: 50, cond_scale: 3, captions: [...]}

`image_size`, `num_frames` and `channels` live in `diffusion` only; the data and the U-Net
take them from there. Every key is checked before anything is built or trained: an unknown
key, a value of the wrong type or out of range gives one `ConfigError` (a `ValueError`)
naming the key, the value and what is allowed. Files are read with a YAML safe loader /
`json.loads` only, so nothing in a file can construct objects.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

SECTIONS = ("unet", "preset", "model", "diffusion", "trainer", "data", "sample")

DATA_KINDS = ("moving-digits", "folder")
SAMPLERS = ("ddpm", "ddim")

# Keys of `diffusion` that are not GaussianDiffusion arguments.
DIFFUSION_EXTRA = {"cond_on_tokens": False}
# Keys of `trainer` that are not Trainer arguments (handled by the command line).
TRAINER_EXTRA = {"max_seconds": 0.0}
# Trainer / GaussianDiffusion arguments the command line sets itself.
TRAINER_RESERVED = (
    "diffusion_model", "folder", "dataset", "results_folder", "device", "resume", "progress", "num_frames",
)
DIFFUSION_RESERVED = ("denoise_fn", "text_encoder")

# data section: kind -> {key: default}; None means "no default, type not fixed".
_MOVING_DIGITS_KEYS = {"num_videos": 2000, "digit_size": 14, "speed": 2.0, "seed": 0}
_FOLDER_KEYS = {
    "folder": "", "frame_mode": "stride", "window": "random", "captions": "auto",
    "probe": "header", "decode_timeout": 10.0, "max_source_frames": 1024,
}
_SAMPLE_KEYS = {
    "sampler": "ddim", "steps": 50, "cond_scale": 1.0, "eta": 0.0, "num_samples": 1,
    "batch_size": 16, "seed": 0, "fps": 8.0, "captions": [],
}


class ConfigError(ValueError):
    """An invalid run configuration: the message names the key, the value and what is allowed."""


# ---------------------------------------------------------------------------------------
# reading and merging

# YAML 1.1 (PyYAML) reads `3e-4` as a string: its floats need a dot. Learning rates are
# written that way, so the loader also takes YAML 1.2 / JSON style exponents.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml ships with the train extra
        raise ImportError("reading YAML configs needs PyYAML: pip install 'spacetime-video[train]'") from err

    class Loader(yaml.SafeLoader):
        """yaml.SafeLoader (no object construction) that also reads `1e-4` as a float."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))
    return Loader


def _yaml_load(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON run configuration (safe loaders only) and check its sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {err}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        _yaml_loader()
        import yaml

        try:
            data = _yaml_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    else:
        raise ConfigError(f"config file must end in .yaml, .yml or .json, got {str(path)!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections {', '.join(SECTIONS)}, "
            f"got a {type(data).__name__}"
        )
    check_sections(data)
    return data


def check_sections(config: Mapping[str, Any]) -> None:
    for key, value in config.items():
        if key not in SECTIONS:
            raise ConfigError(unknown_key_message("config", key, SECTIONS))
        if key in ("unet", "preset"):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        elif value is not None and not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")


def unknown_key_message(where: str, key: Any, allowed: Iterable[str]) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {where} key {key!r}{hint}; allowed keys: {', '.join(allowed)}"


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `override` into a deep copy of `base`, section by section (keys of a section
    in `override` replace those in `base`; other keys are kept). A `data` section of another
    `kind` replaces the whole section."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key == "data" and isinstance(value, dict) and isinstance(out.get(key), dict) \
                and value.get("kind", out[key].get("kind")) != out[key].get("kind"):
            # Another kind of data set: the old kind's keys mean nothing to it.
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.train_lr=3e-4` -> (['trainer', 'train_lr'], 3e-4). Values are parsed as YAML
    scalars/lists (numbers, booleans, null, [1, 2]) and fall back to the raw string."""
    if "=" not in text:
        raise ConfigError(f"an override must look like section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if not path:
        raise ConfigError(f"an override must name a key before '=', got {text!r}")
    try:
        value = _yaml_load(raw)
    except Exception:  # a value YAML cannot read is taken as the literal string
        value = raw
    return path, value


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or `unet=NAME`, `preset=NAME`) overrides in order."""
    out = merge(config, {})
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in SECTIONS:
            raise ConfigError(f"in override {text!r}: " + unknown_key_message("config", path[0], SECTIONS))
        if len(path) == 1:
            out[path[0]] = value
        elif len(path) == 2:
            if path[0] in ("unet", "preset"):
                raise ConfigError(f"{path[0]!r} is a value, not a section: write {path[0]}=NAME, got {text!r}")
            out = merge(out, {path[0]: {path[1]: value}})
        else:
            raise ConfigError(f"overrides go at most two levels deep (section.key=value), got {text!r}")
    check_sections(out)
    return out


# ---------------------------------------------------------------------------------------
# value checks

# Values that must be positive / non-negative wherever they appear, whatever the section.
_POSITIVE = {
    "timesteps", "image_size", "num_frames", "train_batch_size", "train_num_steps",
    "gradient_accumulate_every", "save_and_sample_every", "num_videos", "dim", "channels",
    "attn_heads", "attn_dim_head", "steps", "batch_size", "num_sample_rows", "update_ema_every",
    "num_samples", "train_lr", "digit_size", "speed", "fps", "log_every", "max_source_frames",
    "min_snr_gamma", "resnet_groups", "ff_mult",
}
_NON_NEGATIVE = {
    "warmup_steps", "step_start_ema", "image_phase_steps", "seed", "max_seconds", "weight_decay",
    "num_workers", "cond_scale", "min_snr_floor",
}
_UNIT_INTERVAL = {
    "ema_decay", "null_cond_prob", "image_ratio", "dynamic_thres_percentile", "eta", "min_lr_ratio",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "sampler": SAMPLERS,
    "loss_type": ("l1", "l2", "huber"),
    "objective": ("noise", "x0", "v"),
    "beta_schedule": ("linear", "cosine", "sigmoid"),
    "lr_schedule": ("constant", "cosine", "linear"),
}


def _type_name(expected: type) -> str:
    return {float: "a number", int: "an int", bool: "a bool (true/false)", str: "a string", list: "a list",
            tuple: "a list"}.get(expected, f"a {expected.__name__}")


# "No default": not `inspect.Parameter.empty`, which signature tools read as a missing default.
NO_DEFAULT = object()


def check_value(name: str, value: Any, default: Any = NO_DEFAULT) -> None:
    """Check one value: the type of `default` (when it has one) and the range the key's name
    implies. Raises ConfigError naming `name`, the value and what is allowed."""
    key = name.rsplit(".", 1)[-1]
    if default is not NO_DEFAULT and default is not inspect.Parameter.empty and default is not None \
            and value is not None:
        expected = type(default)
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected in (tuple, list):
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise ConfigError(
                f"{name} must be {_type_name(expected)}, got {value!r} ({type(value).__name__})"
            )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if key in _POSITIVE and value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")
        if key in _UNIT_INTERVAL and not 0 <= value <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key] and value is not None:
        raise ConfigError(f"{name} must be one of {', '.join(_CHOICES[key])}, got {value!r}")


def check_kwargs(section: str, kwargs: Mapping[str, Any], target: Callable[..., Any] | Mapping[str, Any],
                 *, exclude: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> None:
    """Check that `kwargs` are keywords `target` accepts (a callable, or a mapping of key ->
    default), with values of the type its defaults have and in range. `extra` adds keys
    (with defaults) that are not the target's. Raises one ConfigError naming the key, the
    value and what is allowed."""
    exclude = set(exclude)
    if isinstance(target, Mapping):
        defaults = {k: v for k, v in target.items() if k not in exclude}
    else:
        defaults = {
            name: p.default
            for name, p in inspect.signature(target).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in exclude
        }
    defaults.update(extra or {})
    for key, value in kwargs.items():
        if key not in defaults:
            raise ConfigError(unknown_key_message(section, key, defaults))
        check_value(f"{section}.{key}", value, defaults[key])


# ---------------------------------------------------------------------------------------
# the whole run configuration


def _unet_defaults(config_class: type) -> dict[str, Any]:
    import dataclasses

    out = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = None  # a nested part: left to the config class to check
        else:
            out[field.name] = 0 if field.type in ("int", int) else NO_DEFAULT
    return out


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a whole run configuration and return it with defaults filled in where the
    command line needs them (`diffusion.image_size/num_frames/channels`, `data.kind`,
    `model.channels`). Raises ConfigError for the first problem found."""
    import unets

    from diffusion.gaussian import GaussianDiffusion
    from diffusion.trainer import Trainer

    check_sections(config)
    out = merge({section: {} for section in ("model", "diffusion", "trainer", "data", "sample")}, config)
    for section in ("model", "diffusion", "trainer", "data", "sample"):
        if out[section] is None:
            out[section] = {}

    name = out.get("unet")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config key 'unet' must name a U-Net, one of {', '.join(unets.available())}; got {name!r}")
    if name not in unets.available():
        raise ConfigError(unknown_key_message("U-Net", name, unets.available()).replace("key ", "name ", 1))
    preset = out.get("preset")
    if preset is not None and preset not in unets.presets(name):
        raise ConfigError(
            f"preset {preset!r} is not a preset of U-Net {name!r}; allowed: {', '.join(unets.presets(name))}"
        )

    diffusion = out["diffusion"]
    for key in ("image_size", "num_frames"):
        if key not in diffusion:
            raise ConfigError(f"diffusion.{key} is required (a positive int)")
    check_kwargs("diffusion", diffusion, GaussianDiffusion.__init__, exclude=("self", *DIFFUSION_RESERVED),
                 extra=DIFFUSION_EXTRA)
    if isinstance(diffusion["image_size"], bool) or not isinstance(diffusion["image_size"], int):
        raise ConfigError(f"diffusion.image_size must be an int, got {diffusion['image_size']!r}")
    if isinstance(diffusion["num_frames"], bool) or not isinstance(diffusion["num_frames"], int):
        raise ConfigError(f"diffusion.num_frames must be an int, got {diffusion['num_frames']!r}")
    diffusion.setdefault("channels", 3)

    entry = unets.get(name)
    model = out["model"]
    check_kwargs("model", model, _unet_defaults(entry.config_class))
    channels = diffusion["channels"]
    if model.setdefault("channels", channels) != channels:
        raise ConfigError(
            f"model.channels={model['channels']!r} differs from diffusion.channels={channels!r}; "
            "set only diffusion.channels"
        )
    try:
        unet_config = unets.build_config(name, preset=preset, **model)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    net = entry.model_class.from_config(unet_config)
    size, frames = diffusion["image_size"], diffusion["num_frames"]
    if size % net.size_multiple:
        raise ConfigError(
            f"diffusion.image_size must be a multiple of {net.size_multiple} (the size_multiple of this "
            f"{name} U-Net), got {size}"
        )
    if frames % net.frame_multiple:
        raise ConfigError(
            f"diffusion.num_frames must be a multiple of {net.frame_multiple} (the frame_multiple of this "
            f"{name} U-Net), got {frames}"
        )

    check_kwargs("trainer", out["trainer"], Trainer.__init__, exclude=("self", *TRAINER_RESERVED),
                 extra=TRAINER_EXTRA)

    data = out["data"]
    kind = data.setdefault("kind", "moving-digits")
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    fields = _MOVING_DIGITS_KEYS if kind == "moving-digits" else _FOLDER_KEYS
    check_kwargs(f"data ({kind})", {k: v for k, v in data.items() if k != "kind"}, fields)
    if kind == "folder" and not data.get("folder"):
        raise ConfigError("data.folder is required with data.kind=folder (a folder of videos)")
    if kind == "moving-digits":
        if channels not in (1, 3):
            raise ConfigError(f"moving digits have 1 or 3 channels; diffusion.channels is {channels}")
        digit_size = data.get("digit_size", _MOVING_DIGITS_KEYS["digit_size"])
        if not 4 <= digit_size <= size:
            raise ConfigError(
                f"data.digit_size must be between 4 and diffusion.image_size={size}, got {digit_size}"
            )
        if frames < 2:
            raise ConfigError(f"diffusion.num_frames must be >= 2 for moving digits (motion), got {frames}")

    sample = out["sample"]
    check_kwargs("sample", sample, _SAMPLE_KEYS)
    captions = sample.get("captions", [])
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ConfigError(f"sample.captions must be a list of non-empty strings, got {captions!r}")
    return out
