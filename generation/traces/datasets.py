"""Math datasets from local JSON-lines files (GSM8K, MATH500, Omni-MATH), with seeded splits.

Every loader takes a local path; a hub name works only for users who are online and have the
`datasets` package (never needed by the project itself). Bad records raise `DatasetError` naming
the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from generation.traces import answers
from jaxroute.errors import InputError


class DatasetError(InputError):
    pass


@dataclasses.dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str
    gold: str  # final answer as a string (LaTeX for MATH / Omni-MATH)
    dataset: str
    difficulty: float | None = None


# name → (default file inside a folder, question field, gold extractor, difficulty field)
_SPECS = {
    "gsm8k": ("test.jsonl", "question", lambda r: answers.gsm8k_gold(r["answer"]), None),
    "math500": ("test.jsonl", "problem", lambda r: r["answer"], "level"),
    "omnimath": ("omni_math_rule.jsonl", "problem", lambda r: r["answer"], "difficulty"),
}
_REQUIRED = {"gsm8k": ("question", "answer"), "math500": ("problem", "answer"),
             "omnimath": ("problem", "answer")}
_HUB = {"gsm8k": ("openai/gsm8k", "main", "test"), "math500": ("HuggingFaceH4/MATH-500", None, "test"),
        "omnimath": ("KbsdJames/Omni-MATH", None, "test")}


def load(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """Load dataset `name` from a local file or folder (or, online only, from its hub name)."""
    if name not in _SPECS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(_SPECS)}")
    if path is None:
        return _load_hub(name, limit)
    path = Path(path)
    if path.is_dir():
        path = path / _SPECS[name][0]
    if not path.exists():
        raise DatasetError(f"{path}: not found")
    _, q_field, gold_fn, diff_field = _SPECS[name]
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {n}: invalid JSON: {e}") from None
            out.append(_problem(name, rec, f"{path}: line {n}", q_field, gold_fn, diff_field,
                                default_id=f"{name}-{n - 1}"))
            if limit is not None and len(out) >= limit:
                break
    return out


def _problem(name, rec, where, q_field, gold_fn, diff_field, default_id) -> Problem:
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    for field in _REQUIRED[name]:
        if not isinstance(rec.get(field), str) or not rec[field].strip():
            raise DatasetError(f"{where}: field {field!r} is missing or empty")
    gold = gold_fn(rec)
    if gold is None or not str(gold).strip():
        raise DatasetError(f"{where}: no final answer could be read from the gold field")
    diff = rec.get(diff_field) if diff_field else None
    if diff is not None and not isinstance(diff, (int, float)):
        raise DatasetError(f"{where}: field {diff_field!r} must be a number")
    pid = str(rec.get("unique_id") or rec.get("id") or default_id)
    return Problem(pid, rec[q_field], str(gold).strip(), name,
                   None if diff is None else float(diff))


def _load_hub(name: str, limit: int | None) -> list[Problem]:
    try:
        import datasets  # noqa: PLC0415 - optional, online users only
    except ImportError:
        raise DatasetError(f"no path given for {name!r} and the `datasets` package is not "
                           "installed; pass a local JSONL path") from None
    repo, config, split = _HUB[name]
    ds = datasets.load_dataset(repo, config, split=split)
    _, q_field, gold_fn, diff_field = _SPECS[name]
    out = []
    for i, rec in enumerate(ds):
        out.append(_problem(name, dict(rec), f"{repo}[{i}]", q_field, gold_fn, diff_field,
                            default_id=f"{name}-{i}"))
        if limit is not None and len(out) >= limit:
            break
    return out


def split(problems: Sequence[Problem], fractions: Sequence[float] = (0.5, 0.2, 0.3),
          seed: int = 0) -> dict[str, str]:
    """Seeded train / cal / test assignment: problem_id → split name."""
    if len(fractions) != 3 or not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError("fractions must be three non-negative numbers summing to 1")
    order = np.random.default_rng(seed).permutation(len(problems))
    n_train = int(round(fractions[0] * len(problems)))
    n_cal = int(round(fractions[1] * len(problems)))
    names = np.array(["test"] * len(problems), dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train:n_train + n_cal]] = "cal"
    return {p.problem_id: str(names[i]) for i, p in enumerate(problems)}


def cal_and_test(name: str, path: str | Path | None = None, limit: int | None = None,
                 seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """The calibration and test problems of a dataset (its seeded `split`)."""
    problems = load(name, path, limit)
    which = split(problems, seed=seed)
    return ([p for p in problems if which[p.problem_id] == "cal"],
            [p for p in problems if which[p.problem_id] == "test"])
