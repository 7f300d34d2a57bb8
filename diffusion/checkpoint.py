"""Crash-safe files: weights through safetensors, other state through `torch.load(weights_only=True)`.

Every file is first written to a temporary name in its destination folder, flushed and
fsynced, then moved into place with `os.replace`. A rename within one file system is atomic,
so a reader (or a resumed run after a kill) sees either the complete old file or the complete
new one, never a torn write. The temporary file lives in the same folder because `os.replace`
across file systems is not atomic (and may fail outright).

Reading never runs code from a file: weights come through safetensors (a header and raw
buffers), other state through `torch.load(weights_only=True)`, whose unpickler builds only
tensors and plain containers. A file that is not what it claims (a pickle carrying a
callable, a truncated or foreign file) raises `UnsafeCheckpointError` /
`CorruptCheckpointError` (both `ValueError`s) naming the file.

Writes that fail (no space left, a folder turned read-only) raise `CheckpointWriteError`, an
`OSError` keeping the errno, after removing the temporary file; the destination is untouched.

Fault injection, for tests only: with the environment variable `SPACETIME_FAULT_WRITE_DELAY`
set to a number of seconds, every atomic write sleeps that long after its temporary file is
complete and before it is renamed into place, so a test can kill the process mid-write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


FAULT_WRITE_DELAY = "SPACETIME_FAULT_WRITE_DELAY"


class CheckpointWriteError(OSError):
    """A checkpoint (or other atomically written file) could not be written. `errno` is the
    underlying one (e.g. `errno.ENOSPC`, `errno.EACCES`) when known."""

    def __init__(self, message: str, *, errno: int | None = None, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_os_error(cls, error: OSError, what: str) -> CheckpointWriteError:
        if isinstance(error, CheckpointWriteError):
            return error
        reason = error.strerror or str(error)
        hint = ""
        if error.errno == 28:  # ENOSPC
            hint = " (the disk is full: free space or choose another results folder)"
        elif error.errno in (1, 13, 30):  # EPERM, EACCES, EROFS
            hint = " (the folder is not writable: fix its permissions or choose another results folder)"
        return cls(f"{what}: {reason}{hint}", errno=error.errno, path=error.filename)


class UnsafeCheckpointError(ValueError):
    """The file holds objects whose loading would run code; it was not loaded."""


class CorruptCheckpointError(ValueError):
    """The file is truncated, empty or not in the expected format."""


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in `folder`; raise `CheckpointWriteError` if that fails."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise CheckpointWriteError.from_os_error(err, f"results folder {folder} is not writable") from err


def _fault_delay() -> None:
    value = os.environ.get(FAULT_WRITE_DELAY)
    if value:
        time.sleep(float(value))


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointWriteError.from_os_error(err, f"cannot write {path}") from err
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file private (0600); give the result the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                handle.flush()
                os.fsync(handle.fileno())
            _fault_delay()
            os.replace(tmp, path)
        except OSError as err:
            raise CheckpointWriteError.from_os_error(err, f"cannot write {path}") from err
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
    """Read a safetensors file. Anything else (a pickle, a truncated file) raises
    `CorruptCheckpointError`; safetensors never executes code, whatever the file holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except IsADirectoryError:
        raise CorruptCheckpointError(f"{path} is a folder, not a safetensors file") from None
    if len(head) < 8:
        raise CorruptCheckpointError(f"{path} is not a safetensors file: {len(head)} bytes, truncated or empty")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, ValueError, OSError, RuntimeError) as err:
        # Only named once safetensors has refused it: a valid header length can start
        # with these bytes too.
        pickled = head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5)
        kind = " (it looks like a pickle / torch.save file: weights are read from safetensors only)" if pickled else ""
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file{kind}: {type(err).__name__}: {err}"
        ) from err


def save_state(state: Any, path: str | os.PathLike) -> Path:
    """`torch.save` atomically. Keep `state` to tensors and plain Python types so that
    `load_state` (which uses `weights_only=True`) can read it back without unpickling code."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain Python types only. A file whose
    pickle would build any other object (and so could run code) raises
    `UnsafeCheckpointError` without running it; an unreadable file `CorruptCheckpointError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise FileNotFoundError(f"cannot read checkpoint state {path}: {err.strerror or err}") from err
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only's unpickler refuses every global outside its allow-list (tensors,
        # containers, numbers, strings) before calling it: nothing in the file has run.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        globals_named = [line for line in lines if "GLOBAL" in line or "global" in line]
        if not globals_named:
            raise CorruptCheckpointError(f"{path} is not a readable checkpoint state file ({lines[0] if lines else err})") from err
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain Python types, whose "
            f"unpickling could run code ({globals_named[0]}). Checkpoints here are read with "
            "torch.load(weights_only=True); load it yourself only if you trust its origin"
        ) from err
    except Exception as err:  # the unpickler meets garbage in many ways (KeyError, EOFError, ...)
        raise CorruptCheckpointError(f"{path} is not a readable checkpoint state file ({type(err).__name__}: {err})") from err
