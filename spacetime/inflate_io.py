"""What is trained of an inflated model, on its own: the temporal layers (and LoRA adapters on
the 2D model's attention, `diffusion.lora`) saved as one small safetensors file that a fresh
`inflate` of the same 2D model takes back, as AnimateDiff ships motion modules apart from the
image model (Guo et al. 2023, sec. 4.2).

The file holds the trained tensors under the inflated model's state-dict keys and, as
metadata, a fingerprint of the 2D model's architecture (its keys and shapes, not its values),
so loading it into an inflate of a different 2D model fails with a clear message instead of a
silent partial load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import Tensor, nn

from spacetime.params import temporal_parameters

__all__ = ["adapter_state_dict", "architecture_fingerprint", "load_adapter", "save_adapter"]

_FORMAT = "spacetime-temporal-v1"
# A temporal file is small; a limit keeps a wrong path (a full checkpoint) from being read whole.
_MAX_BYTES = 4 * 1024**3


def _is_lora(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The temporal parameters and LoRA weights of `model`, under its state-dict keys."""
    temporal = {id(p) for p in temporal_parameters(model)}
    return {
        name: p.detach()
        for name, p in model.named_parameters(remove_duplicate=True)
        if id(p) in temporal or _is_lora(name)
    }


def architecture_fingerprint(model: nn.Module) -> str:
    """A hash of the 2D model's state-dict keys and shapes (what must match to load)."""
    keys_2d = getattr(model, "keys_2d", None)
    state = model.state_dict()
    names = keys_2d if keys_2d is not None else [k for k in state if not _is_lora(k)]
    shapes = model.state_dict_2d() if hasattr(model, "state_dict_2d") else state
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{tuple(shapes[name].shape)};".encode())
    return digest.hexdigest()[:24]


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the temporal (+LoRA) weights of `model` to `path` (safetensors), atomically."""
    from safetensors.torch import save_file

    from diffusion.checkpoint import atomic_write

    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no temporal or LoRA parameters to save")
    metadata = {
        "format": _FORMAT,
        "architecture": architecture_fingerprint(model),
        "lora": json.dumps(getattr(model, "lora_config", None)),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), keep_suffix=True)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    from unets.guards import BadFileError, regular_file

    file = regular_file(path, what="temporal weights file", max_bytes=_MAX_BYTES)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise BadFileError(f"temporal weights file {str(path)!r} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != _FORMAT:
        raise BadFileError(
            f"{str(path)!r} is not a temporal weights file (format {metadata.get('format')!r}, expected {_FORMAT!r})"
        )
    return tensors, metadata


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a file written by `save_adapter` into `model` (a fresh inflate of the same 2D
    model, with LoRA added the same way if the file has LoRA weights)."""
    tensors, metadata = read_adapter(path)
    expected = architecture_fingerprint(model)
    if metadata.get("architecture") != expected:
        raise ValueError(
            f"temporal weights {str(path)!r} were saved from an inflate of a different 2D model "
            f"(architecture {metadata.get('architecture')}, this one {expected})"
        )
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        hint = " (add LoRA the same way before loading)" if any(_is_lora(k) for k in unexpected) else ""
        raise ValueError(
            f"temporal weights {str(path)!r} do not match this model{hint}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise ValueError(f"temporal weights {str(path)!r}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    model.load_state_dict(tensors, strict=False)
