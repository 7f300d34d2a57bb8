"""Save and load registered U-Nets: a folder with `config.json` and `model.safetensors`.

Weights only ever go through safetensors, so loading unpickles nothing. Files are written to
a temporary name in the same folder and renamed into place, so an interrupted save never
leaves a half-written file under the real name (docs/design.md "Checkpoints").

Loading trusts nothing in the folder: both files must be regular files (a FIFO would block
forever), `config.json` is bounded in size and nesting, the model it describes is sized on
the meta device before any memory is taken (a config edited to `dim: 10**12` is refused
naming its largest settings), and a truncated or corrupt safetensors file is a `BadFileError`
naming it.

Weights saved with an older parameter layout load through the key maps of `unets.upgrade`;
`model.safetensors` records the layout version in its metadata.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unets.frame_cond import fill_missing
from unets.guards import BadFileError, check_memory, read_json, regular_file
from unets.upgrade import METADATA_KEY, layout_version, upgrade_state_dict

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "check_model_size", "load", "load_weights", "model_bytes", "save_pretrained"]

# A U-Net config is a few hundred bytes; a megabyte is generous and still cheap to parse.
MAX_CONFIG_BYTES = 1 << 20

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write `model.config` as `config.json` and its state dict as `model.safetensors`."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"{type(model).__name__} has no config with to_dict(); is it a registered U-Net?")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    # safetensors refuses tensors sharing storage and non-contiguous views; our modules have
    # neither, but a clone keeps user-registered U-Nets (tied weights) saveable too.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _write_atomic(folder / CONFIG_NAME, write_config)
    metadata = {"format": "pt", METADATA_KEY: str(layout_version(model))}
    _write_atomic(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
    return folder


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, version: int | None = None,
                 assign: bool = False) -> nn.Module:
    """Copy `state_dict` into `model`, requiring exactly its keys and shapes; otherwise raise
    `ValueError` naming every missing, unexpected and mis-shaped entry. A state dict in an
    older layout of `model` (layout `version`, or any when None) is upgraded first
    (`unets.upgrade`); the names reported are those of the current layout.

    `assign=True` makes the model's tensors the state dict's own (cast to the model's dtypes
    where they differ) instead of copying them: for state dicts read from a file, whose
    tensors nothing else holds. Weights that safetensors maps from the file then stay mapped,
    as diffusers' `from_pretrained` leaves them: no second copy, and a model built on the
    meta device is never allocated at all. Writes stay private to the process (safetensors
    maps the file copy-on-write). A tensor the state dict holds under two keys is cloned for
    the second, so assigning ties nothing; models with tied weights are copied into, since
    assigning would untie them."""
    state_dict = upgrade_state_dict(model, state_dict, version)
    # Weights from before frame conditioning: its projection loads as the zeros it starts at.
    state_dict = fill_missing(model, state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    problems = []
    if missing:
        problems.append(f"missing weights {missing}")
    if unexpected:
        problems.append(f"unexpected weights {unexpected}")
    if mismatched:
        problems.append(f"mismatched shapes {mismatched}")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    if assign and not _has_tied_tensors(model):
        owned: dict[str, Tensor] = {}
        seen: set[int] = set()
        for key, value in state_dict.items():
            value = value.to(expected[key].dtype).contiguous()
            owned[key] = value.clone() if id(value) in seen else value
            seen.add(id(value))
        model.load_state_dict(owned, strict=True, assign=True)
    else:
        model.load_state_dict(dict(state_dict), strict=True)
    return model


def _has_tied_tensors(model: nn.Module) -> bool:
    # By identity, as modules tie weights (and as the meta device allows: no storage there).
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False) if t is not None]
    return len({id(t) for t in tensors}) < len(tensors)


def model_bytes(config: Mapping | object, **overrides: object) -> float | int:
    """Bytes the parameters and buffers of the U-Net `config` describes would take, found by
    building it on the meta device (no memory is allocated; shapes too large to even
    describe count as unbounded)."""
    from unets.registry import build

    try:
        with torch.device("meta"):
            model = build(config, **overrides)
    except (RuntimeError, OverflowError, MemoryError):
        # "Storage size calculation overflowed" and the like: beyond any machine.
        return math.inf
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _largest_settings(config: Mapping | object, count: int = 3) -> str:
    items = config.items() if isinstance(config, Mapping) else vars(config).items()
    numbers = [(k, v) for k, v in items if isinstance(v, int) and not isinstance(v, bool)]
    numbers.sort(key=lambda kv: -kv[1])
    return ", ".join(f"{k}={v}" for k, v in numbers[:count]) or "no numeric setting"


def check_model_size(config: Mapping | object, *, what: str = "U-Net config", limit: int | None = None) -> None:
    """Raise `ValueError` when the U-Net `config` would not fit in this machine's memory,
    naming its largest numeric settings, before anything is allocated."""
    check_memory(model_bytes(config), what=f"{what} ({_largest_settings(config)})", limit=limit)


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the U-Net saved by `save_pretrained(path)` and load its weights."""
    from unets.registry import build

    folder = Path(path)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.exists() and not p.is_symlink():
            raise FileNotFoundError(f"{p} not found; expected a folder written by save_pretrained()")
    config = read_json(config_path, what="U-Net config", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise BadFileError(f"U-Net config {str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    check_model_size(config, what=f"U-Net config {str(config_path)!r}")
    regular_file(weights_path, what="U-Net weights")
    model = build(config)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except Exception as err:  # SafetensorError, or OSError from a file cut short under mmap
        raise BadFileError(
            f"U-Net weights {str(weights_path)!r} are not a readable safetensors file "
            f"(truncated or corrupt?): {err}"
        ) from None
    # The file's tensors become the model's (load_weights, assign): nothing else holds them.
    load_weights(model, state, version=_saved_version(weights_path), assign=True)
    return model.to(map_location)


def _saved_version(weights_path: Path) -> int | None:
    """The layout version `save_pretrained` recorded, or None for files written before it did."""
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as f:
        value = (f.metadata() or {}).get(METADATA_KEY)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BadFileError(
            f"U-Net weights {str(weights_path)!r}: metadata {METADATA_KEY}={value!r} is not a version >= 1"
        )
    return int(value)
