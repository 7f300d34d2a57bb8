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
import io
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unets.guards import BadFileError, machine_memory, read_bytes, read_text, regular_file

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


class WeightsMismatchError(CorruptCheckpointError):
    """A checkpoint's weights are intact but do not fit the model built from the config
    (missing, unexpected or differently shaped tensors): the config changed since."""


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
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path` atomically.

    If the body raises (or the process dies), `path` is left untouched and the temporary file
    is removed (or, after a kill, left behind under a hidden `.tmp` name that loaders never
    read). `keep_suffix` ends the temporary name with `path`'s extension, for writers that
    choose the format by it (image and video encoders).
    """
    path = Path(path)
    suffix = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, keep_suffix: bool = False) -> Path:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    with atomic_path(path, keep_suffix=keep_suffix) as tmp:
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
    `CorruptCheckpointError`; a FIFO, device or folder in its place `BadFileError`, before
    it is opened (a FIFO would block the read forever). safetensors never executes code,
    whatever the file holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = regular_file(path, what="weights file", max_bytes=machine_memory())
    head = read_bytes_prefix(path, 8)
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


def read_whole(path: Path, *, what: str, max_bytes: int | None = None) -> bytes:
    """A regular file's bytes, refused (`BadFileError`) when larger than `max_bytes`
    (default: this machine's memory)."""
    # The limit passed on is the size found, not the memory: a read of up to N bytes
    # reserves N bytes first.
    limit = machine_memory() if max_bytes is None else max_bytes
    size = regular_file(path, what=what, max_bytes=limit).stat().st_size
    return read_bytes(path, what=what, max_bytes=size)


def read_bytes_prefix(path: Path, count: int) -> bytes:
    """The first `count` bytes of a regular file, opened without blocking (should the path
    have been swapped for a FIFO since it was checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise BadFileError(f"{path} cannot be read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(count)


def save_state(state: Any, path: str | os.PathLike) -> Path:
    """`torch.save` atomically. Keep `state` to tensors and plain Python types so that
    `load_state` (which uses `weights_only=True`) can read it back without unpickling code."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain Python types only. A file whose
    pickle would build any other object (and so could run code) raises
    `UnsafeCheckpointError` without running it; an unreadable file `CorruptCheckpointError`;
    a FIFO, device or folder in its place `BadFileError` (all `ValueError`s)."""
    path = Path(path)
    data = read_whole(path, what="checkpoint state")
    if len(data) == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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


# ---------------------------------------------------------------------------------------
# a run's checkpoints: layout, the `latest` pointer, RNG state, validated reads

CHECKPOINT_PREFIX = "checkpoint-"
LATEST = "latest"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")
# 2: optimizer state keyed by parameter names (torch.distributed.checkpoint.state_dict),
# which FSDP and plain runs share; version 1 (keyed by position) is still read.
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
_POINTER_BYTES = 4096


class IncompleteRunError(ValueError):
    """Resuming was asked for, checkpoint folders exist, and none of them is complete:
    starting over would silently discard the run's metrics."""


def milestone_name(milestone: int | str) -> str:
    name = str(milestone)
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"milestone must be an int or a plain name, got {milestone!r}")
    return name


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and python global generators, as tensors and plain types."""
    import random

    import numpy as np

    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# field -> (test, what is allowed); checked before any of the state is applied, so a
# malformed file is one named error instead of a KeyError deep inside a restore.
_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "seed": (_is_int, "an int"),
    "optimizer": (lambda v: isinstance(v, Mapping), "a mapping"),
    "scaler": (lambda v: isinstance(v, Mapping), "a mapping"),
    "data": (lambda v: isinstance(v, Mapping) and _is_int(v.get("length")) and _is_int(v.get("batch_size")),
             "a mapping with int 'length' and 'batch_size'"),
    "scheduler": (lambda v: isinstance(v, Mapping) and isinstance(v.get("base_lrs"), list)
                  and all(_is_number(x) for x in v["base_lrs"])
                  and (v.get("horizon") is None or _is_int(v["horizon"]) and v["horizon"] >= 1),
                  "a mapping with 'base_lrs' (a list of numbers) and 'horizon' (None or an int >= 1)"),
    "rng": (lambda v: isinstance(v, Mapping) and isinstance(v.get("torch"), Tensor)
            and v["torch"].dtype == torch.uint8 and isinstance(v.get("cuda"), list)
            and isinstance(v.get("numpy"), Mapping) and isinstance(v["numpy"].get("keys"), Tensor)
            and v["numpy"]["keys"].numel() == 624 and _is_int(v["numpy"].get("pos"))
            and _is_int(v["numpy"].get("has_gauss")) and _is_number(v["numpy"].get("cached_gaussian"))
            and isinstance(v.get("python"), Mapping) and _is_int(v["python"].get("version"))
            and isinstance(v["python"].get("internal"), list) and len(v["python"]["internal"]) == 625
            and all(_is_int(x) for x in v["python"]["internal"])
            and (v["python"].get("gauss_next") is None or _is_number(v["python"]["gauss_next"])),
            "the torch / cuda / numpy / python generator states this library writes"),
}


def check_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`state` (read from the checkpoint state file `path`) if it has every field a resume
    needs with the right types; else `CorruptCheckpointError` naming the file and field."""
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint state mapping")
    version = state.get("version")
    if version not in READABLE_STATE_VERSIONS:
        raise CorruptCheckpointError(
            f"{path}: field 'version' is {version!r}; this library reads checkpoint versions {READABLE_STATE_VERSIONS}"
        )
    for field, (test, allowed) in _STATE_FIELDS.items():
        if field not in state:
            raise CorruptCheckpointError(f"{path}: field {field!r} is missing")
        try:
            good = test(state[field])
        except Exception:  # a hostile value whose comparison itself fails
            good = False
        if not good:
            shown = repr(state[field]) if not isinstance(state[field], (Mapping, list, Tensor)) else type(state[field]).__name__
            raise CorruptCheckpointError(f"{path}: field {field!r} must be {allowed}, got {shown[:80]}")
    return state


class CheckpointManager:
    """The checkpoints of one run folder (torchtitan's `CheckpointManager` is the model).

    Layout: `run_dir/checkpoint-<milestone>/` holding `model.safetensors`, `ema.safetensors`
    (weights only) and `state.pt` (optimizer, scaler, step, seed, RNG states: tensors and
    plain types, read with `torch.load(weights_only=True)`), and `run_dir/latest`, a text
    file naming the newest one. A checkpoint is assembled in a hidden staging folder and
    renamed into place, then `latest` is replaced atomically, so a crash at any moment
    leaves the previous checkpoint intact and `latest` naming a complete one.

    Every file is read through `unets.guards` (a regular file of bounded size: a FIFO in
    place of a weights file is refused, never opened). `latest` must name a checkpoint
    folder inside the run folder; a pointer that is unreadable, not UTF-8, names a path
    outside the run (`../other/checkpoint-1`, an absolute path) or an incomplete folder is
    ignored with a warning, and the newest complete checkpoint is used instead.

    Only the writing process (rank 0 under torchrun) calls `write`; every rank reads."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)

    def folder(self, milestone: int | str) -> Path:
        return self.run_dir / f"{CHECKPOINT_PREFIX}{milestone_name(milestone)}"

    def folders(self) -> list[Path]:
        """Every `checkpoint-*` entry of the run folder, complete or not."""
        return sorted(self.run_dir.glob(f"{CHECKPOINT_PREFIX}*")) if self.run_dir.is_dir() else []

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().parent == self.run_dir.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return False

    def is_complete(self, folder: Path) -> bool:
        """All three files present as regular files (`is_file` is False for a FIFO), in a
        folder that lies in this run (a symlink out of it does not count)."""
        if not self._inside(folder):
            return False
        try:
            return all((folder / name).is_file() for name in CHECKPOINT_FILES)
        except OSError:
            return False

    def complete(self) -> list[Path]:
        return [folder for folder in self.folders() if self.is_complete(folder)]

    def _pointed(self) -> Path | None:
        pointer = self.run_dir / LATEST
        if not os.path.lexists(pointer):
            return None
        try:
            name = read_text(pointer, what="checkpoint pointer", max_bytes=_POINTER_BYTES).strip()
        except (OSError, ValueError) as err:
            logger.warning("ignoring %s: %s", pointer, err)
            return None
        if not name.startswith(CHECKPOINT_PREFIX) or os.sep in name or "/" in name or "\0" in name:
            logger.warning("ignoring %s: it names %r, not a checkpoint folder of this run", pointer, name[:200])
            return None
        target = self.run_dir / name
        if not self._inside(target):
            logger.warning("ignoring %s: %s leads outside the run folder %s", pointer, target, self.run_dir)
            return None
        if not self.is_complete(target):
            logger.warning("%s names %s, which is incomplete; looking for another checkpoint", pointer, target)
            return None
        return target

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, or (pointer lost, damaged or hostile) the newest
        complete one, or None when the run has no complete checkpoint."""
        target = self._pointed()
        if target is not None:
            return target
        complete = self.complete()
        if not complete:
            return None
        return max(complete, key=lambda path: (path / "state.pt").stat().st_mtime_ns)

    def resumable(self) -> Path | None:
        """For resuming: the latest checkpoint, None for a run with no checkpoint folder at
        all, and `IncompleteRunError` when folders exist but none is complete."""
        latest = self.latest()
        if latest is None and self.folders():
            names = ", ".join(p.name for p in self.folders()[:5])
            raise IncompleteRunError(
                f"cannot resume {self.run_dir}: it holds checkpoint folders ({names}) but none is complete "
                f"(each needs {', '.join(CHECKPOINT_FILES)} as regular files); move them away, or start a "
                "fresh run in another folder"
            )
        return latest

    def find(self, milestone: int | str) -> Path:
        """The folder of a complete checkpoint: `'latest'` or -1 for the newest."""
        if milestone in (LATEST, -1):
            folder = self.latest()
            if folder is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.run_dir} to load")
            return folder
        folder = self.folder(milestone)
        if not self.is_complete(folder):
            available = [p.name for p in self.complete()]
            raise FileNotFoundError(f"no complete checkpoint at {folder}; found {available}")
        return folder

    # --- reading ------------------------------------------------------------------------

    def read_state(self, folder: Path) -> dict[str, Any]:
        return check_state(load_state(folder / "state.pt"), folder / "state.pt")

    def read_weights(self, folder: Path, which: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        if which not in ("model", "ema"):
            raise ValueError(f"which must be 'model' or 'ema', got {which!r}")
        return load_tensors(folder / f"{which}.safetensors", device=device)

    def restore(self, folder: Path, *, model: Any, ema_model: Any, optimizer: Any, scaler: Any, sharded: bool,
                device: str | torch.device, strict: bool = True, now: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
        """Load checkpoint `folder` into a training session (weights, EMA, optimizer, scaler,
        global RNG states) and return its validated state, with `folder` added. Files that
        are damaged or do not fit the model raise a `ValueError` naming them; the state file
        is fully checked before anything is changed. `now` (the session's `seed`, data
        `length`, `batch_size`, `world_size`) is compared with the checkpoint's, with a
        warning where the resumed run cannot continue the interrupted one's data order."""
        from diffusion import distributed

        state = self.read_state(folder)
        where = "cpu" if sharded else device
        weights = (self.read_weights(folder, "model", where), self.read_weights(folder, "ema", where))
        try:
            distributed.load_full_state(model, ema_model, optimizer, weights, state["optimizer"],
                                        version=state["version"], sharded=sharded, strict=strict)
            if state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise CorruptCheckpointError(f"checkpoint {folder} cannot be restored: {str(err)[:2000]}") from None
            # load_state_dict's report: a header line, then one line per mismatched tensor.
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise WeightsMismatchError(f"checkpoint {folder} does not fit this model: {first}") from None
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CorruptCheckpointError(f"checkpoint {folder} does not fit this model and trainer: "
                                         f"{type(err).__name__}: {str(err)[:2000]}") from None
        if now is not None:
            if state["seed"] != now["seed"]:
                logger.warning("checkpoint was trained with seed %d, not %d: continuing with its seed",
                               state["seed"], now["seed"])
            data = state["data"]
            if (data["length"], data["batch_size"]) != (now["length"], now["batch_size"]):
                logger.warning("data differs from the checkpoint's (%d items, batch %d; now %d, %d): the data "
                               "order will not continue the interrupted run's",
                               data["length"], data["batch_size"], now["length"], now["batch_size"])
            if state.get("world_size", 1) != now["world_size"]:
                logger.info("checkpoint written by %s process(es), resumed by %d", state.get("world_size", 1),
                            now["world_size"])
        return {**state, "folder": folder}

    # --- writing ------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the run folder and make sure files can be made in it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointWriteError.from_os_error(err, f"cannot create results folder {self.run_dir}") from err
        check_writable(self.run_dir)

    def write(self, milestone: int | str, *, model_state: Mapping[str, Tensor], ema_state: Mapping[str, Tensor],
              state: Mapping[str, Any]) -> Path:
        """Write checkpoint `milestone` and point `latest` at it. A failed write raises
        `CheckpointWriteError` naming the file, with the previous checkpoint untouched."""
        name = milestone_name(milestone)
        target = self.folder(name)
        if os.path.islink(target):
            # The link itself is replaced (never followed: that would write outside the run,
            # and a dangling or looping one leads nowhere), so the checkpoint is not lost.
            logger.warning("replacing the symlink %s (to %r) by a checkpoint folder", target, os.readlink(target))
        # Debris of writes a kill interrupted: this process is the folder's only writer.
        for stale in self.run_dir.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.run_dir.glob(f".{LATEST}.*.tmp"):
            stale.unlink(missing_ok=True)
        staging = self.run_dir / f".{target.name}.tmp-{os.getpid()}"
        try:
            try:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
            except OSError as err:
                raise CheckpointWriteError.from_os_error(err, f"cannot create {staging}") from err
            step = {"step": str(state.get("step"))}
            save_tensors(model_state, staging / "model.safetensors", metadata=step)
            save_tensors(ema_state, staging / "ema.safetensors", metadata=step)
            save_state(dict(state), staging / "state.pt")
            self._swap_in(staging, target)
            atomic_write_text(self.run_dir / LATEST, target.name + "\n")
        except CheckpointWriteError as err:
            shutil.rmtree(staging, ignore_errors=True)
            previous = self.latest()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"{err}; {kept}", errno=err.errno, path=err.filename) from err
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _swap_in(self, staging: Path, target: Path) -> None:
        # A folder cannot be renamed over a non-empty one, so an existing checkpoint of the
        # same name is moved aside first and removed once the new one is in place.
        retired = None
        try:
            if os.path.lexists(target):
                retired = self.run_dir / f".{target.name}.old-{os.getpid()}"
                if retired.exists():
                    shutil.rmtree(retired)
                os.replace(target, retired)
            os.replace(staging, target)
        except OSError as err:
            if retired is not None and not os.path.lexists(target):
                os.replace(retired, target)  # put the old one back
            raise CheckpointWriteError.from_os_error(err, f"cannot move {staging} to {target}") from err
        if retired is not None:
            if retired.is_dir() and not retired.is_symlink():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                retired.unlink(missing_ok=True)
