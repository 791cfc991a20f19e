"""Durable files: atomic whole-file writes and crash-safe JSON-lines appends.

Every layer writes through these (trace sets, online records, router exports, reports), so a
reader never sees a half-written file and a crash loses at most the record in flight.
"""

from __future__ import annotations

import json
import os
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
    """Drop a torn final line (no trailing newline) left by a crash. Returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep

__all__ = ["append_records", "atomic_write_text", "repair_tail"]
