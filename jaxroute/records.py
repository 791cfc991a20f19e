"""Live routing records: one JSON line per problem of an online run, next to a trace manifest.

    folder/manifest.json   the trace format's manifest (models, prices, features, provenance)
    folder/paths.jsonl     {"problem_id", "dataset", "difficulty", "method", "correct", "verdict",
                            "status", "pieces": [{"model", "text", "cost", "kept", "features",
                            "decision", "score", "whole", "replaces"}], "scorer_cost": {...}}

Not the tree format: a live path has no counterfactual branches. Costs use the trace format's
cost fields, so `record_cost` prices them exactly as `trace.pack` prices a tree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jaxroute import accounting, trace, traceset
from jaxroute.durable import atomic_write_text

PATHS = "paths.jsonl"


NO_VERDICT = ("timeout", "error")  # answer checks that gave no verdict (decision 73)


def usable(rec: dict) -> bool:
    """A record a result can be made of: every request succeeded and the answer check gave a
    verdict (decision 72). Others are left out of every summary and counted."""
    return not str(rec.get("status", "ok")).startswith("error") and \
        rec.get("verdict") not in NO_VERDICT


def record_cost(rec: dict, models: Sequence[trace.ModelInfo], cost_model: str) -> float:
    """Generation cost of one problem in `cost_model` units, discarded drafts included."""
    return float(sum(accounting.cost_of(p["cost"], models[p["model"]], cost_model)
                     for p in rec["pieces"]))


def scorer_cost(rec: dict, cost_model: str) -> float:
    """The rule's own scoring compute in the same units (FLOPs or US cents)."""
    c = rec.get("scorer_cost") or {}
    if cost_model == "usd_cents":
        return 100.0 * float(c.get("usd", 0.0))
    return float(c.get("flops", 0.0)) / accounting.FLOP_UNITS[cost_model]


def write_paths(folder: Path, manifest: trace.Manifest, records: Sequence[dict]) -> Path:
    """`manifest.json` + `paths.jsonl` (atomic: a reader never sees a half-written file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / trace.MANIFEST, json.dumps(manifest.to_json(), indent=2)
                            + "\n")
    atomic_write_text(folder / PATHS, "".join(json.dumps(r) + "\n" for r in records))
    return folder


def read_paths(folder: Path) -> tuple[trace.Manifest, list[dict]]:
    folder = Path(folder)
    manifest = traceset.read_manifest(folder)
    out = []
    for line, rec in traceset.read_records(folder / PATHS):
        where = f"{folder / PATHS}:{line}"
        for key, kind in (("problem_id", str), ("correct", bool), ("pieces", list)):
            if not isinstance(rec.get(key), kind):
                raise trace.TraceFormatError(f"{where}: field {key!r} must be {kind.__name__}")
        for j, p in enumerate(rec["pieces"]):
            if not isinstance(p.get("model"), int) or not 0 <= p["model"] < manifest.num_models:
                raise trace.TraceFormatError(f"{where}.pieces[{j}]: field 'model' out of range")
            if not isinstance(p.get("cost"), dict):
                raise trace.TraceFormatError(f"{where}.pieces[{j}]: field 'cost' missing")
        out.append(rec)
    return manifest, out
