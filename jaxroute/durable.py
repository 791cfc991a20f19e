"""Durable files: atomic whole-file writes and crash-safe JSON-lines appends.

Every layer writes through these (trace sets, online records, router exports, reports), so a
reader never sees a half-written file and a crash loses at most the record in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file and rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append JSON lines durably: one write of whole lines, then fsync.

    A crash can leave at most a torn *last* line, which `read_records` reports and `repair_tail`
    drops; earlier lines are never touched.
    """
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: str | os.PathLike) -> int:
    """Drop a torn final line (no trailing newline, not a whole JSON value) left by a crash;
    a final line that is whole JSON only lacks its newline, which is added. Returns the bytes
    removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    if whole_json(data[keep:]):
        with open(path, "ab") as f:
            f.write(b"\n")
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def whole_json(raw: bytes) -> bool:
    """Is `raw` one complete JSON value (UTF-8)?"""
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return False

# Non-finite numbers in the JSON files this project writes (decision 90): strings, so every
# parser reads the files (RFC 8259 has no NaN or Infinity); `read_json` turns them back.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def strict_json(obj, **kw) -> str:
    """`json.dumps(obj, **kw)` as strict JSON: NaN, +∞ and −∞ (Python or NumPy floats) are
    written as the strings "NaN", "Infinity", "-Infinity"; nothing else changes."""
    return json.dumps(_finite(obj), allow_nan=False, **kw)


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral):
        x = float(x)
        if not math.isfinite(x):
            return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def read_json(text: str):
    """Parse a file `strict_json` wrote: the strings "NaN", "Infinity", "-Infinity" become the
    floats again (the older files' bare NaN and Infinity are read too)."""
    return _nonfinite(json.loads(text))


def _nonfinite(x):
    if isinstance(x, dict):
        return {k: _nonfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nonfinite(v) for v in x]
    return NONFINITE.get(x, x) if isinstance(x, str) else x


__all__ = ["NONFINITE", "FolderInUse", "append_records", "atomic_write_text", "exclusive",
           "read_json", "repair_tail", "replace_folder", "strict_json", "whole_json"]


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder `tmp` in place of `path` as one unit: a reader finds the old
    folder or the new one, never a mix (an existing `path` is moved aside first and removed
    after). `tmp` must be beside `path` (one filesystem); its mode follows the umask."""
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FolderInUse(FileExistsError):
    """Another process holds the folder's lock (one writer per folder)."""


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike):
    """Hold `folder`'s writer lock (an exclusive `flock` on `folder/.lock`) for the block, or
    refuse at once, naming the holder's pid: two runs writing one folder would duplicate records
    or interleave checkpoints (decision 78). The lock dies with its process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUse(f"{folder} is in use by process {holder} (one writer per folder:"
                              " wait for it, or use another folder)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock
