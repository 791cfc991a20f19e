"""Trace-set files: a folder with `manifest.json` and `trees.jsonl` (the format: `jaxroute.trace`).

Whole sets are written atomically (`write_trace_set`), read and validated record by record with
errors that name the file, line and field (`read_manifest`, `read_records`, `load_trace_set`),
and a damaged set is made loadable again conservatively (`repair`, decision 78). Resumable
appends during generation are `generation.traces.tracegen`'s.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jaxroute.durable import atomic_write_text, whole_json
from jaxroute.errors import InputError, quote
from jaxroute.trace import MANIFEST, TREES, Manifest, TraceFormatError, validate_problem


def write_trace_set(folder: str | os.PathLike, manifest: Manifest, problems: Iterable[dict]) -> None:
    """Write a whole trace set atomically (manifest last, so a readable manifest means complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    problems = list(problems)
    for i, p in enumerate(problems):
        validate_problem(p, manifest, where=f"{folder / TREES}: record {i + 1}")
    atomic_write_text(folder / TREES,
                      "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in problems))
    atomic_write_text(folder / MANIFEST, json.dumps(manifest.to_json(), indent=2) + "\n")



def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise TraceFormatError(f"{path}: not found (is {folder} a trace set?)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}: invalid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return Manifest.from_json(d, str(path))



MAX_RECORD_BYTES = 64 << 20  # a longer line is not a trace record (and is never read whole)


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a JSON-lines file, with clear errors that quote at most
    a bounded prefix of anything in the file (decision 90)."""
    with open(path, "rb") as f:
        for n in itertools.count(1):
            raw = f.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_RECORD_BYTES:
                raise TraceFormatError(f"{path}: line {n} is longer than {MAX_RECORD_BYTES} "
                                       "bytes: not a trace record")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TraceFormatError(f"{path}: line {n}: not UTF-8 ({e.reason} at byte "
                                       f"{e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith("\n"):  # a whole last record without its newline is kept
                    raise TraceFormatError(
                        f"{path}: line {n}: truncated last line (an interrupted write); run "
                        f"`python -m launch.repair --traces={Path(path).parent}` or re-run the "
                        "generator") from None
                raise TraceFormatError(f"{path}: line {n}: invalid JSON: {e}") from None
            except (ValueError, RecursionError) as e:  # 5000-digit integers, deep nesting
                raise TraceFormatError(f"{path}: line {n}: unreadable JSON value "
                                       f"({quote(str(e) or type(e).__name__)})") from None
            yield n, rec


def load_trace_set(folder: str | os.PathLike) -> tuple[Manifest, list[dict]]:
    """Read and validate a trace set; problems with a non-"ok" root status are kept (reported by
    `pack` via `PackedTrees.ok`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    path = folder / TREES
    if not path.exists():
        raise TraceFormatError(f"{path}: not found")
    problems, seen = [], set()
    for n, p in read_records(path):
        validate_problem(p, manifest, where=f"{path}: line {n}")
        if p["problem_id"] in seen:
            raise TraceFormatError(f"{path}: line {n}: duplicate problem_id "
                                   f"{quote(p['problem_id'])}")
        seen.add(p["problem_id"])
        problems.append(p)
    if not problems:
        raise TraceFormatError(f"{path}: no problems")
    return manifest, problems



class RepairRefused(InputError):
    """`repair` would drop most of a trace set for one reason: a manifest/records mismatch to
    fix, not damage to repair."""



def repair(folder: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Make a damaged trace set loadable again (decision 78), conservatively: keep every record
    that parses and validates (a whole last record without its newline too); drop a torn last
    line, invalid records and duplicate problem ids (the first valid record of an id is kept —
    two writers appended the same problems). When most records fail the same check (an edited
    manifest, not damage) it refuses, naming the check, unless `force`. The old file is kept
    as `trees.jsonl.bak` — or `.bak.1`, `.bak.2`, … : a backup is never overwritten — and the
    repaired one is written atomically. Returns what was kept and dropped."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    path = folder / TREES
    report: dict[str, Any] = {"kept": 0, "torn_bytes": 0, "invalid": [], "duplicates": [],
                              "backup": None}
    data = path.read_bytes()
    if data and not data.endswith(b"\n") and not whole_json(data[data.rfind(b"\n") + 1:]):
        report["torn_bytes"] = len(data) - (data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    keep, seen, reasons = [], set(), collections.Counter()
    # Lines end at "\n" only: a "\r" is JSON whitespace inside a record the loader accepts.
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            if len(raw) > MAX_RECORD_BYTES:
                raise TraceFormatError(f"longer than {MAX_RECORD_BYTES} bytes")
            rec = json.loads(raw.decode("utf-8"))
            validate_problem(rec, manifest, where=f"{path}: line {n}")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            message = str(e).removeprefix(f"{path}: line {n}: ")
            report["invalid"].append(f"line {n}: {message[:160]}")
            reasons[_reason(message)] += 1
            continue
        if rec["problem_id"] in seen:
            report["duplicates"].append(f"line {n}: {quote(rec['problem_id'])}")
            continue
        seen.add(rec["problem_id"])
        keep.append(raw.decode("utf-8"))
    if reasons and not force:
        reason, count = reasons.most_common(1)[0]
        if count > len(keep):
            raise RepairRefused(
                f"{path}: {count} of {count + len(keep) + len(report['duplicates'])} records "
                f"fail the same check ({reason}); that is a manifest/records mismatch (was "
                f"{folder / MANIFEST} edited?), not damage — nothing was changed. Fix the "
                "manifest, or repair with --force to drop them")
    backup = path.with_name(TREES + ".bak")
    for i in itertools.count(1):
        if not backup.exists():
            break
        backup = path.with_name(f"{TREES}.bak.{i}")
    shutil.copyfile(path, backup)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    report["kept"], report["backup"] = len(keep), str(backup)
    return report



def _reason(message: str) -> str:
    """A validation message without what varies per record (numbers, quoted ids)."""
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", message))[:120]


# How far two floats of "the same" record may be apart, relative to max(|a|, |b|, 1): features
# come from float32 log-softmaxes of logits of size ~10, whose last bits depend on the batch's
# shape; a margin (a difference of two log-probs) carries both errors (measured up to 1.2e-5).
FLOAT_TOLERANCE = 1e-4


def record_differences(a, b, path="") -> tuple[list[str], float]:
    """(paths where two records differ, the largest gap between their floats, relative to
    max(|a|, |b|, 1)). Texts, token ids, labels, counts and costs must be identical; a float
    computed from the model's float32 activations may differ in its last bits
    (`FLOAT_TOLERANCE`), because a batch of another composition has another shape (so has one
    process with another --chunk)."""
    if isinstance(a, float) and isinstance(b, float):
        gap = abs(a - b) / max(abs(a), abs(b), 1.0)
        return ([path] if gap > FLOAT_TOLERANCE else []), gap
    if type(a) is not type(b):
        return [path], 0.0
    if isinstance(a, dict):
        pairs = [(a.get(k), b.get(k), f"{path}.{k}") for k in sorted(set(a) | set(b))]
    elif isinstance(a, list):
        if len(a) != len(b):
            return [path], 0.0
        pairs = [(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    else:
        return ([path] if a != b else []), 0.0
    bad, worst = [], 0.0
    for x, y, p in pairs:
        d, g = record_differences(x, y, p)
        bad += d
        worst = max(worst, g)
    return bad, worst


def compare_records(records: list[dict], ref: list[dict]) -> tuple[int, int, float]:
    """(records equal to `ref`'s up to float32 rounding, records bit-identical, the largest
    float gap): how equal two trace sets of the same problems are, e.g. a fanned-out run and a
    single process (decision 93). Other problems or another order, or a record that differs
    beyond rounding, is an `InputError` naming the problem and the first fields."""
    if [r["problem_id"] for r in records] != [r["problem_id"] for r in ref]:
        raise InputError(f"the sets hold other problems or another order ({len(records)} vs "
                         f"{len(ref)} records)")
    identical, worst = 0, 0.0
    for a, b in zip(records, ref, strict=True):
        bad, gap = record_differences(a, b)
        if bad:
            raise InputError(f"problem {quote(a['problem_id'])} differs at {', '.join(bad[:5])}")
        identical += json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        worst = max(worst, gap)
    return len(records), identical, worst
