"""Statistics every report uses: bootstrap CIs by problem, AUROC, per-problem means (the
calibration's exchangeable unit, decision 24), a cost curve's lower hull and the accuracy-matched
costs read off it. Pure numpy."""

from __future__ import annotations

from typing import Any

import numpy as np


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, seed: int = 0, reps: int = 2000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean of `values`, resampling whole problems (`groups`)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values.astype(float))
    counts = np.bincount(inv)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(uniq), (reps, len(uniq)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)



def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / n₊n₋);
    nan when a class is empty. `scores`, `labels` `[N]`."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, cnt = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv]  # average 1-based rank over ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))



def cost_at_accuracy(curve: list[dict], accuracy: float) -> float:
    """Cost a method needs for `accuracy`, on the lower convex hull of its (accuracy, cost) points
    (mixing two operating points at random reaches any point between them). nan if out of range."""
    pts = sorted({(r["accuracy"], r["cost"]) for r in curve})
    hull: list[tuple[float, float]] = []
    for p in pts:  # lower hull, increasing accuracy
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    # Keep the part where cost does not decrease with accuracy (the efficient frontier).
    start = int(np.argmin([c for _, c in hull]))
    front = hull[start:]
    xs, ys = [x for x, _ in front], [y for _, y in front]
    if accuracy < xs[0]:
        return ys[0]
    if accuracy > xs[-1]:
        return float("nan")
    return float(np.interp(accuracy, xs, ys))



def per_problem(values: np.ndarray, problems: np.ndarray) -> np.ndarray:
    """Mean of `values` `[N, ...]` over each problem's instances (its roots): `[n_problems, ...]`
    in sorted problem order — the exchangeable unit of every calibration (decision 24)."""
    _, inv = np.unique(problems, return_inverse=True)
    out = np.zeros((inv.max() + 1,) + values.shape[1:]) if len(inv) else np.zeros((0,) +
                                                                                  values.shape[1:])
    np.add.at(out, inv, values)
    return out / np.bincount(inv).reshape((-1,) + (1,) * (values.ndim - 1))


def matched_costs(rows: list[dict], curves: dict[str, list[dict]],
                  reference: str = "router (ours)") -> dict[str, Any]:
    """The secondary, accuracy-matched view: each curve's cost at the reference row's accuracy."""
    # Lower hull of each curve; nan when out of reach.
    ref = next((r for r in rows if r["method"] == reference), None)
    if ref is None:
        return {}
    return {"reference": reference, "accuracy": ref["accuracy"], "cost": ref["cost"],
            "costs": {name: cost_at_accuracy(c, ref["accuracy"]) for name, c in curves.items()
                      if name != reference}}
