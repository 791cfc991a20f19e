"""Trace trees: recorded generations from which every sticky routing policy's outcome is known.

A *trace set* is a folder with `manifest.json` and `trees.jsonl` (one problem per line); its files
are read, written and repaired by `jaxroute.traceset`, and costs are accounted by
`jaxroute.accounting`. This module is the format: the manifest, the record schema and its
validation, and the packed array view every learner and evaluation reads (`pack`).

Semantics (decisions 20–22). A *segment* is a run of steps by one model. Decision t
observes step t of the current segment. "Continue" moves to step t+1 (after the final step it ends
the episode with that segment's answer). "Escalate to k'" discards step t and lets model k'
regenerate from the prefix y_{<t} (sticky: it never comes back). The escalation target is either a
*leaf* (the largest model completes the solution: outcome and cost only) or, for K ≥ 3, a further
segment with its own steps and branches.

Per problem (one JSON object):

    {"problem_id": str, "dataset": str, "difficulty": float | null, "split": "train"|"cal"|"test",
     "solo": [Outcome per model k (model k alone from scratch); the last one is R_M],
     "roots": [Segment, ...]}                       # sampled trajectories of model 0
    Segment = {"model": k, "correct": bool, "status": "ok" | "<failure>",
               "steps": [Step, ...]}
    Step    = {"features": [D floats], "cost": Cost, "verifier_ok": bool | null,
               "branches": {"<k'>": Leaf | Segment for every k' > k}}
    Leaf    = {"model": K-1, "correct": bool, "cost": Cost}       # Outcome has the same fields
    Cost    = {"flops": float, "input_tokens": int, "cached_input_tokens": int,
               "output_tokens": int}

Costs are kept as FLOPs and token counts; `pack` turns them into one cost unit: FLOPs in 1e12
("flops") or US cents from the manifest's per-model prices ("usd_cents").
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxroute.accounting import COST_FIELDS, COST_MODELS, cost_of
from jaxroute.errors import InputError, quote

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TREES = "trees.jsonl"
SPLITS = ("train", "cal", "test")


# Largest sane values: beyond them a number is corruption, and it would overflow the float32
# arrays packing makes (decision 77).
F32_MAX = float(np.finfo(np.float32).max)
FIELD_MAX = {"params": 1e15, "price_input": 1e6, "price_cached_input": 1e6,
             "price_output": 1e6, "flops": 1e40, "tokens": 1e12, "feature": 1e30}


class TraceFormatError(InputError):
    """A trace file that does not follow the format; the message names file, problem and field."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    params: float  # N, parameter count (FLOPs per generated token = 2N)
    price_input: float = 0.0  # USD per 1M input tokens
    price_cached_input: float = 0.0  # USD per 1M cached input tokens
    price_output: float = 0.0  # USD per 1M output tokens


@dataclasses.dataclass(frozen=True)
class Manifest:
    models: tuple[ModelInfo, ...]  # ordered small → large
    feature_names: tuple[str, ...]
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    synthetic: bool = False
    schema_version: int = SCHEMA_VERSION

    @property
    def num_models(self) -> int:
        return len(self.models)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["models"] = [dataclasses.asdict(m) for m in self.models]
        d["feature_names"] = list(self.feature_names)
        return d

    @classmethod
    def from_json(cls, d: dict, path: str = MANIFEST) -> Manifest:
        if not isinstance(d, dict):
            raise TraceFormatError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            version = int(d["schema_version"])
            if version != SCHEMA_VERSION:
                raise TraceFormatError(f"{path}: schema_version {version} is not supported "
                                       f"(this jaxroute reads {SCHEMA_VERSION})")
            models = tuple(ModelInfo(**m) for m in d["models"])
            feats = tuple(str(f) for f in d["feature_names"])
        except KeyError as e:
            raise TraceFormatError(f"{path}: missing field {e.args[0]!r}") from None
        except TypeError as e:
            raise TraceFormatError(f"{path}: bad model entry: {e}") from None
        if len(models) < 2:
            raise TraceFormatError(f"{path}: field 'models' needs at least 2 models")
        for i, m in enumerate(models):
            for f in ("params", "price_input", "price_cached_input", "price_output"):
                v = getattr(m, f)
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                        or v < 0 or v > FIELD_MAX[f]:
                    raise TraceFormatError(f"{path}: models[{i}].{f} must be a number in "
                                           f"[0, {FIELD_MAX[f]:g}], got {v!r}")
        if not feats:
            raise TraceFormatError(f"{path}: field 'feature_names' is empty")
        return cls(models=models, feature_names=feats, provenance=d.get("provenance", {}),
                   synthetic=bool(d.get("synthetic", False)), schema_version=version)


# ------------------------------------------------------------------------------------------------
# Reading and validation


def _need(d: Any, key: str, kind, where: str):
    if not isinstance(d, dict):
        raise TraceFormatError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise TraceFormatError(f"{where}: missing field {key!r}")
    val = d[key]
    if kind is float:
        ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val) \
            and abs(val) <= FIELD_MAX["flops"]
    elif kind is int:
        ok = isinstance(val, int) and not isinstance(val, bool) and 0 <= val <= FIELD_MAX["tokens"]
    else:
        ok = isinstance(val, kind)
    if not ok:
        raise TraceFormatError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}"
                               f" (finite and sane, non-negative for counts), got {quote(val)}")
    return val


# The fields every cost record has (`prefill_flops`, where present, is a separate column).


def _check_cost(c: Any, where: str) -> None:
    _need(c, "flops", float, where)
    if c["flops"] < 0:
        raise TraceFormatError(f"{where}: field 'flops' must be ≥ 0, got {c['flops']}")
    for k in COST_FIELDS[1:]:
        _need(c, k, int, where)
    if c["cached_input_tokens"] > c["input_tokens"]:
        raise TraceFormatError(f"{where}: cached_input_tokens > input_tokens")


def _check_segment(seg: Any, k_models: int, n_feat: int, where: str, depth: int) -> None:
    model = _need(seg, "model", int, where)
    if model >= k_models - 1:
        raise TraceFormatError(f"{where}: a segment of model {model} cannot branch (the largest "
                               f"model's continuations are leaves)")
    _need(seg, "correct", bool, where)
    steps = _need(seg, "steps", list, where)
    if not steps and seg.get("status", "ok") == "ok":
        raise TraceFormatError(f"{where}: field 'steps' is empty")
    for t, step in enumerate(steps):
        w = f"{where}.steps[{t}]"
        feats = _need(step, "features", list, w)
        if len(feats) != n_feat or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and abs(x) <= FIELD_MAX["feature"] for x in feats):
            raise TraceFormatError(f"{w}: field 'features' must be {n_feat} finite numbers "
                                   f"of magnitude ≤ {FIELD_MAX['feature']:g}")
        _check_cost(_need(step, "cost", dict, w), f"{w}.cost")
        v = step.get("verifier_ok")
        if v is not None and not isinstance(v, bool):
            raise TraceFormatError(f"{w}: field 'verifier_ok' must be bool or null")
        branches = _need(step, "branches", dict, w)
        for kp in range(model + 1, k_models):
            wb = f"{w}.branches[{kp}]"
            if str(kp) not in branches:
                raise TraceFormatError(f"{wb}: missing escalation branch to model {kp}")
            br = branches[str(kp)]
            if kp == k_models - 1:
                if _need(br, "model", int, wb) != kp:
                    raise TraceFormatError(f"{wb}: field 'model' must be {kp}")
                _need(br, "correct", bool, wb)
                _check_cost(_need(br, "cost", dict, wb), f"{wb}.cost")
            else:
                if _need(br, "model", int, wb) != kp:
                    raise TraceFormatError(f"{wb}: field 'model' must be {kp}")
                _check_segment(br, k_models, n_feat, wb, depth + 1)


def validate_problem(p: Any, manifest: Manifest, where: str) -> None:
    """Raise TraceFormatError naming `where` (file and record) and the field if `p` is malformed."""
    pid = p.get("problem_id") if isinstance(p, dict) else None
    where = f"{where} (problem {quote(pid)})" if pid is not None else where
    _need(p, "problem_id", str, where)
    _need(p, "dataset", str, where)
    split = _need(p, "split", str, where)
    if split not in SPLITS:
        raise TraceFormatError(f"{where}: field 'split' must be one of {SPLITS}, got "
                               f"{quote(split)}")
    d = p.get("difficulty")
    if d is not None and not (isinstance(d, (int, float)) and math.isfinite(d)):
        raise TraceFormatError(f"{where}: field 'difficulty' must be a number or null")
    k = manifest.num_models
    solo = _need(p, "solo", list, where)
    if len(solo) != k:
        raise TraceFormatError(f"{where}: field 'solo' needs {k} outcomes (one per model)")
    for i, o in enumerate(solo):
        _need(o, "correct", bool, f"{where}.solo[{i}]")
        _check_cost(_need(o, "cost", dict, f"{where}.solo[{i}]"), f"{where}.solo[{i}].cost")
    roots = _need(p, "roots", list, where)
    if not roots:
        raise TraceFormatError(f"{where}: field 'roots' is empty")
    for j, seg in enumerate(roots):
        if _need(seg, "model", int, f"{where}.roots[{j}]") != 0:
            raise TraceFormatError(f"{where}.roots[{j}]: field 'model' must be 0")
        _check_segment(seg, k, len(manifest.feature_names), f"{where}.roots[{j}]", 0)


def problem_errors(p: dict) -> list[str]:
    """Every failed request recorded in a problem (statuses "error: …" of its roots, their
    branches at any depth, its solo runs, or the problem itself): such a problem is unusable —
    its outcomes or R_M would be wrong (decision 72)."""
    out = []

    def seg(s):
        st = s.get("status", "ok")
        if isinstance(st, str) and st.startswith("error"):
            out.append(st)
        for step in s.get("steps", []):
            for br in step.get("branches", {}).values():
                seg(br)

    top = p.get("status", "ok")
    if isinstance(top, str) and top.startswith("error"):
        out.append(top)
    for r in p.get("roots", []):
        seg(r)
    for o in p.get("solo", []):
        seg(o)
    return out


# ------------------------------------------------------------------------------------------------
# Packed array view


class PackedTrees(NamedTuple):
    """Padded arrays for P problems, S segments per problem, T steps per segment, K models.

    Segment 0..J−1 of each problem are its sampled roots (model 0); further segments are the
    intermediate-model branches (K ≥ 3). Costs are in one unit (see `cost_unit`).
    """

    features: np.ndarray  # [P, S, T, D] float32
    step_cost: np.ndarray  # [P, S, T] float32 cost of generating step t of segment s
    verifier_ok: np.ndarray  # [P, S, T] bool (True where unlabelled)
    seg_len: np.ndarray  # [P, S] int32 (0 for padding segments)
    seg_model: np.ndarray  # [P, S] int32
    seg_correct: np.ndarray  # [P, S] bool, the segment's own final answer
    branch_seg: np.ndarray  # [P, S, T, K] int32 child segment index, −1 for a leaf or invalid
    branch_correct: np.ndarray  # [P, S, T, K] bool outcome of a leaf branch
    branch_cost: np.ndarray  # [P, S, T, K] float32 cost of a leaf branch (0 for segment children)
    num_roots: np.ndarray  # [P] int32 J_p
    solo_correct: np.ndarray  # [P, K] bool
    solo_cost: np.ndarray  # [P, K] float32
    difficulty: np.ndarray  # [P] float32 (nan when unknown)
    split: np.ndarray  # [P] int8 index into SPLITS
    ok: np.ndarray  # [P] bool every root has status "ok"

    @property
    def num_problems(self) -> int:
        return self.seg_len.shape[0]

    @property
    def num_models(self) -> int:
        return self.solo_correct.shape[1]

    def subset(self, idx: np.ndarray) -> PackedTrees:
        return PackedTrees(*(np.asarray(a)[idx] for a in self))

    def fingerprint(self) -> str:
        """sha256 of every packed array: the identity of the data a run trained on."""

        h = hashlib.sha256()
        for a in self:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype, a.shape)).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def require_splits(self, *names: str, where: str = "the trace set") -> None:
        """Refuse, before any work, a trace set without usable problems in these splits."""
        missing = [n for n in names if len(self.split_indices(n)) == 0]
        if missing:
            counts = {n: int(len(self.split_indices(n))) for n in SPLITS}
            raise TraceFormatError(f"{where} has no usable problems in the split(s) {missing} "
                                   f"(usable per split: {counts})")

    def split_indices(self, name: str) -> np.ndarray:
        return np.flatnonzero((self.split == SPLITS.index(name)) & self.ok)


# Padding of the per-segment arrays (axis 1 = segment, axis 2 = step); see `pack`.
_SEGMENT_AXES = {"features": 2, "step_cost": 2, "verifier_ok": 2, "seg_len": 1, "seg_model": 1,
                 "seg_correct": 1, "branch_seg": 2, "branch_correct": 2, "branch_cost": 2}
_PAD = {"verifier_ok": True, "branch_seg": -1}


def pack(manifest: Manifest, problems: Sequence[dict], cost_model: str = "flops") -> PackedTrees:
    """Pack validated problems into padded arrays (see `PackedTrees`)."""
    if cost_model not in COST_MODELS:
        raise ValueError(f"cost_model must be one of {COST_MODELS}, got {cost_model!r}")
    k = manifest.num_models
    d = len(manifest.feature_names)
    flat: list[list[dict]] = []  # per problem, list of segments (roots first, then BFS children)
    links: list[list[dict]] = []  # per problem, per segment: {(t, k'): child index}
    for p in problems:
        segs, link = list(p["roots"]), [dict() for _ in p["roots"]]
        i = 0
        while i < len(segs):
            for t, step in enumerate(segs[i]["steps"]):
                for kp in range(segs[i]["model"] + 1, k - 1):
                    link[i][(t, kp)] = len(segs)
                    segs.append(step["branches"][str(kp)])
                    link.append({})
            i += 1
        flat.append(segs)
        links.append(link)
    n = len(problems)
    s_max = max(len(s) for s in flat)
    t_max = max(max((len(seg["steps"]) for seg in s), default=1) for s in flat)
    t_max = max(t_max, 1)
    out = dict(
        features=np.zeros((n, s_max, t_max, d), np.float32),
        step_cost=np.zeros((n, s_max, t_max), np.float32),
        verifier_ok=np.full((n, s_max, t_max), _PAD["verifier_ok"], bool),
        seg_len=np.zeros((n, s_max), np.int32),
        seg_model=np.zeros((n, s_max), np.int32),
        seg_correct=np.zeros((n, s_max), bool),
        branch_seg=np.full((n, s_max, t_max, k), _PAD["branch_seg"], np.int32),
        branch_correct=np.zeros((n, s_max, t_max, k), bool),
        branch_cost=np.zeros((n, s_max, t_max, k), np.float32),
        num_roots=np.zeros(n, np.int32),
        solo_correct=np.zeros((n, k), bool),
        solo_cost=np.zeros((n, k), np.float32),
        difficulty=np.full(n, np.nan, np.float32),
        split=np.zeros(n, np.int8),
        ok=np.ones(n, bool),
    )
    models = manifest.models
    for i, (p, segs, link) in enumerate(zip(problems, flat, links, strict=True)):
        out["num_roots"][i] = len(p["roots"])
        out["split"][i] = SPLITS.index(p["split"])
        if p.get("difficulty") is not None:
            out["difficulty"][i] = p["difficulty"]
        out["ok"][i] = (all(r.get("status", "ok") == "ok" for r in p["roots"])
                        and not problem_errors(p))
        for kk, o in enumerate(p["solo"]):
            out["solo_correct"][i, kk] = o["correct"]
            out["solo_cost"][i, kk] = cost_of(o["cost"], models[kk], cost_model)
        for s, seg in enumerate(segs):
            m = seg["model"]
            out["seg_len"][i, s] = len(seg["steps"])
            out["seg_model"][i, s] = m
            out["seg_correct"][i, s] = seg["correct"]
            for t, step in enumerate(seg["steps"]):
                out["features"][i, s, t] = step["features"]
                out["step_cost"][i, s, t] = cost_of(step["cost"], models[m], cost_model)
                if step.get("verifier_ok") is not None:
                    out["verifier_ok"][i, s, t] = step["verifier_ok"]
                for kp in range(m + 1, k):
                    if kp == k - 1:
                        leaf = step["branches"][str(kp)]
                        out["branch_correct"][i, s, t, kp] = leaf["correct"]
                        out["branch_cost"][i, s, t, kp] = cost_of(leaf["cost"], models[kp],
                                                                   cost_model)
                    else:
                        out["branch_seg"][i, s, t, kp] = link[s][(t, kp)]
    return PackedTrees(**out)


def concat(parts: Sequence[PackedTrees]) -> PackedTrees:
    """Problems of several packs in one, padded to the largest segment and step counts with
    the same fill values as `pack` (so `concat([pack(a), pack(b)]) == pack(a + b)`)."""
    if not parts:
        raise ValueError("concat needs at least one PackedTrees")
    s_max = max(p.seg_len.shape[1] for p in parts)
    t_max = max(p.step_cost.shape[2] for p in parts)
    out = {}
    for name in PackedTrees._fields:
        arrays = [getattr(p, name) for p in parts]
        axes = _SEGMENT_AXES.get(name, 0)
        if axes:
            want = (s_max, t_max)[:axes]
            arrays = [np.pad(a, [(0, 0)] + [(0, w - a.shape[1 + j]) for j, w in enumerate(want)]
                             + [(0, 0)] * (a.ndim - 1 - axes),
                             constant_values=_PAD.get(name, 0)) for a in arrays]
        out[name] = np.concatenate(arrays)
    return PackedTrees(**out)


def pack_stream(manifest: Manifest, problems: Iterable[dict], cost_model: str = "flops",
                chunk: int = 4096) -> PackedTrees:
    """`pack` of a stream of problems, `chunk` at a time, so that at most `chunk` problems are
    held as Python dicts (100 000 dict trees take gigabytes, decision 81)."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    parts, batch = [], []
    for p in problems:
        batch.append(p)
        if len(batch) == chunk:
            parts.append(pack(manifest, batch, cost_model))
            batch = []
    if batch:
        parts.append(pack(manifest, batch, cost_model))
    if not parts:
        raise ValueError("pack_stream: no problems to pack")
    return parts[0] if len(parts) == 1 else concat(parts)


def spend(manifest: Manifest, problems: Sequence[dict]) -> dict[str, float]:
    """What generating `problems` cost: US dollars (at the manifest's prices) and PFLOPs."""
    usd = pack(manifest, problems, "usd_cents")
    flops = pack(manifest, problems, "flops")
    return {"$": float(usd.step_cost.sum() + usd.branch_cost.sum()) / 100,
            "PFLOPs": float(flops.step_cost.sum() + flops.branch_cost.sum()) / 1e3}


