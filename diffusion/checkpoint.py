"""Crash-safe files: weights through safetensors, other state through `torch.load(weights_only=True)`.

Every file is first written to a temporary name in its destination folder, flushed and
fsynced, then moved into place with `os.replace`. A rename within one file system is atomic,
so a reader (or a resumed run after a kill) sees either the complete old file or the complete
new one, never a torn write. The temporary file lives in the same folder because `os.replace`
across file systems is not atomic (and may fail outright).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry; without this a power loss can undo it.
    # Not every platform lets a directory be opened (Windows), hence the guard.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path` atomically.

    If the body raises (or the process dies), `path` is left untouched and the temporary file
    is removed (or, after a kill, left behind under a `.tmp` name that loaders never read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file private (0600); give the result the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensors(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a flat name -> tensor mapping as safetensors, atomically.

    Tensors are made contiguous and moved to CPU; tensors sharing storage (tied weights) are
    cloned, because safetensors refuses shared storage.
    """
    from safetensors.torch import save_file

    flat: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"save_tensors expects tensors only, got {type(tensor).__name__} for {name!r}")
        tensor = tensor.detach().to("cpu")
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if key in seen and key != -1:
            tensor = tensor.clone()
        else:
            seen.add(key)
        flat[name] = tensor.contiguous()
    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def load_tensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def save_state(state: Any, path: str | os.PathLike) -> Path:
    """`torch.save` atomically. Keep `state` to tensors and plain Python types so that
    `load_state` (which uses `weights_only=True`) can read it back without unpickling code."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
