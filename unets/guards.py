"""Guards against hostile or careless input: files we read back, sizes we allocate.

Every file the library reads back (a run's `config.json`, a checkpoint's `state.pt` and
safetensors, a `latest` pointer, a YAML run config) goes through these helpers, so that one
rule holds everywhere:

- it must be a regular file: a FIFO would block the read forever, a device could stream
  without end, a folder is a mistake; each is refused before it is opened;
- it must be at most `max_bytes` long, checked on the open file (no read loads more);
- text must be UTF-8, and JSON nested at most `MAX_DEPTH` deep (Python's JSON decoder
  recurses, so a deeply nested file would end in a `RecursionError`).

`check_memory` refuses an allocation larger than the machine's memory before it is tried,
naming the setting that asked for it.

Problems with the file's content raise `BadFileError` (a `ValueError`) naming the file and
what was wrong; a missing file raises `FileNotFoundError`. Both are user errors to the
command line, which prints them as one line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "BadFileError",
    "check_depth",
    "check_memory",
    "machine_memory",
    "read_bytes",
    "read_json",
    "read_text",
    "regular_file",
]

# Configs of this library are at most four levels deep; 64 leaves room for user mappings.
MAX_DEPTH = 64
_MiB = 1 << 20


class BadFileError(ValueError):
    """A file that exists but cannot be used: wrong kind, too large, not UTF-8, corrupt."""


def regular_file(path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None) -> Path:
    """`path` as a `Path` once it is known to name a regular file of at most `max_bytes`.
    Symlinks are followed (a dangling or looping one is reported as such)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise BadFileError(f"{what} {str(path)!r} is a symlink to a missing file") from None
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES on a parent ...
        raise BadFileError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else (
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
        )
        raise BadFileError(f"{what} {str(path)!r} is {kind}; expected a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise BadFileError(
            f"{what} {str(path)!r} is {info.st_size:,} bytes; at most {max_bytes:,} are allowed"
        )
    return path


def read_bytes(path: str | os.PathLike, *, what: str = "file", max_bytes: int = 16 * _MiB) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see `regular_file`)."""
    path = regular_file(path, what=what, max_bytes=max_bytes)
    # O_NONBLOCK: if the path was swapped for a FIFO after the check, open() must not wait.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise BadFileError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadFileError(f"{what} {str(path)!r} is not a regular file")
        # Sized to the file (one byte more shows growth past the limit), not to the limit: a
        # large limit must not reserve that much memory for a small file.
        data = f.read(min(info.st_size, max_bytes) + 1)
    if len(data) > max_bytes:
        raise BadFileError(f"{what} {str(path)!r} is larger than the {max_bytes:,} bytes allowed")
    return data


def read_text(path: str | os.PathLike, *, what: str = "file", max_bytes: int = 16 * _MiB) -> str:
    """A regular file's text, which must be UTF-8."""
    data = read_bytes(path, what=what, max_bytes=max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadFileError(f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def check_depth(text: str, *, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse JSON (or YAML flow) text whose brackets nest deeper than `max_depth`. Brackets
    inside strings do not count. A linear scan, so it is safe on any input size."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise BadFileError(f"{what} nests deeper than {max_depth} levels")
        elif char in "]}":
            depth -= 1


def read_json(path: str | os.PathLike, *, what: str = "JSON file", max_bytes: int = 16 * _MiB,
              max_depth: int = MAX_DEPTH) -> Any:
    """Parse a regular UTF-8 JSON file of bounded size and nesting depth."""
    text = read_text(path, what=what, max_bytes=max_bytes)
    check_depth(text, what=f"{what} {str(path)!r}", max_depth=max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadFileError(f"{what} {str(path)!r} is not valid JSON: {err}") from None


def machine_memory() -> int:
    """Bytes of physical memory on this machine (an upper bound on what can be allocated)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 40


def check_memory(nbytes: float | int, *, what: str, limit: int | None = None) -> None:
    """Raise `ValueError` naming `what` when `nbytes` exceed `limit` (default: the machine's
    physical memory), before anything is allocated."""
    limit = machine_memory() if limit is None else limit
    if nbytes > limit:
        if nbytes == float("inf"):
            raise ValueError(f"{what} describes tensors too large to allocate on any machine")
        raise ValueError(
            f"{what} would need about {nbytes / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB "
            "of memory this machine has"
        )
