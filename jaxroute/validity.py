"""Does each guarantee hold as stated? Re-split calibration and test many times, never retrain.

A method's knob is calibrated on n problems and deployed; its *risk* is the miscoverage it
then has on fresh problems. Over calibration draws the two guarantees promise (decision 88):

- marginal (conformal risk control): E[risk] ≤ α;
- PAC (Learn then Test at δ): P(risk ≤ α) ≥ 1 − δ.

`pool_outcomes` walks a method's whole knob grid once on a large pool of problems (per-problem
miscoverage and cost `[P, G]`); `resplit` then draws R random calibration sets of size n from
the pool, calibrates each by `guarantee.conformal_choice` (all R at once) and measures the chosen
knob's miscoverage and cost on the rest of the pool (its estimate of the risk; with thousands of
test problems its own noise is ±2·√(α(1−α)/N_test)). Nothing here trains: the methods are fixed,
only the calibration draw varies — exactly the randomness the guarantees are about.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxroute import env, guarantee, stats
from jaxroute.trace import PackedTrees


def pool_outcomes(trees: PackedTrees, family: guarantee.Family, problems: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(miscoverage, cost), each `[P, G]` per problem of `problems` (sorted) at every knob value
    (averages over a problem's sampled roots): miscoverage = routed wrong while the large model
    is right."""
    dev = env.to_device(trees)
    pi, ri = env.instances(trees, np.asarray(problems))
    correct, cost, _ = guarantee.walk_grid(trees, dev, family, pi, ri)
    miss = ((~correct) & trees.solo_correct[pi, -1][None]).T.astype(float)
    return stats.per_problem(miss, pi), stats.per_problem(cost.T.astype(float), pi)


def split_orders(p: int, calibration: int, resplits: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows `[R, calibration]`, test rows `[R, p − calibration]`) of R random
    permutations of a pool of p problems (seeded: every method sees the same draws)."""
    if not 0 < calibration < p:
        raise ValueError(f"calibration size {calibration} must be in (0, {p})")
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(p) for _ in range(resplits)])  # [R, P]
    return order[:, :calibration], order[:, calibration:]


def resplit(errors: np.ndarray, cost: np.ndarray, alpha: float, delta: float | None,
            calibration: int, resplits: int, seed: int = 0) -> dict[str, np.ndarray]:
    """R = `resplits` random calibration sets of `calibration` problems from the pool (the rest
    is the test set each time); per re-split: the knob index chosen, whether calibration was
    feasible, and the test miscoverage and mean cost at that knob. `[R]` arrays."""
    cal, test = split_orders(errors.shape[0], calibration, resplits, seed)
    idx, feasible = guarantee.conformal_choice(errors[cal], alpha, delta)
    return {"index": idx, "feasible": feasible,
            "miscoverage": errors[test, idx[:, None]].mean(1),
            "cost": cost[test, idx[:, None]].mean(1)}


def summarize(r: dict[str, np.ndarray], alpha: float, delta: float | None,
              test_size: int) -> dict[str, Any]:
    """What each guarantee promises, checked: mean miscoverage with its Monte-Carlo standard
    error (marginal: ≤ α up to it), the share of re-splits with miscoverage ≤ α (PAC: ≥ 1 − δ up
    to its binomial standard error), the mean cost and the share of feasible calibrations.
    `holds` allows two standard errors of the Monte-Carlo draw."""
    miss, n = r["miscoverage"], len(r["miscoverage"])
    mc = float(miss.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    share = float(np.mean(miss <= alpha))
    if delta is None:
        holds = bool(miss.mean() <= alpha + 2 * mc)
    else:
        holds = bool(share >= 1 - delta - 2 * math.sqrt(delta * (1 - delta) / n))
    return {"mean_miscoverage": float(miss.mean()), "mc_error": mc, "share_within": share,
            "cost": float(r["cost"].mean()), "cost_sd": float(r["cost"].std()),
            "feasible": float(np.mean(r["feasible"])), "holds": holds, "resplits": n,
            "test_size": test_size,
            "test_noise": 2 * math.sqrt(alpha * (1 - alpha) / max(test_size, 1))}


def data_draws(trees: PackedTrees, families: dict[str, list[guarantee.Family]],
               alphas, resplits: int = 5, seed: int = 0, delta: float | None = None
               ) -> dict[str, Any]:
    """The spread over data draws: the trees' calibration ∪ test problems re-split R times into
    calibration and test sets of the original sizes (the same draws for every method), each
    method calibrated on each draw's calibration set at each α and measured on its test set.
    `families`: method → its families (several: one per training seed, reported as their mean
    per draw, with the training-seed spread beside it).

    Returns {"resplits", "calibration", "test", "alphas": {α: {method: {"ratio": [R] cost /
    large-only cost on the draw's test set, "coverage": [R], "seed_sd": mean over draws of the
    sd across the method's families}}}}."""
    pool = np.concatenate([trees.split_indices("cal"), trees.split_indices("test")])
    n_cal = len(trees.split_indices("cal"))
    cal, test = split_orders(len(pool), n_cal, resplits, seed)
    # per problem, sorted as `pool_outcomes` returns them
    large = np.sort(pool)
    large_cost = trees.solo_cost[large, -1].astype(float)  # solo costs: one per problem
    base = large_cost[test].mean(1)  # [R]
    outcomes = {m: [pool_outcomes(trees, f, pool) for f in fams] for m, fams in families.items()}
    out: dict[str, Any] = {"resplits": resplits, "calibration": n_cal,
                           "test": len(pool) - n_cal, "alphas": {}}
    for alpha in alphas:
        rows = {}
        for m, outs in outcomes.items():
            ratio, cover = [], []
            for errors, cost in outs:
                idx, _ = guarantee.conformal_choice(errors[cal], alpha, delta)
                ratio.append(cost[test, idx[:, None]].mean(1) / base)
                cover.append(1.0 - errors[test, idx[:, None]].mean(1))
            ratio, cover = np.stack(ratio), np.stack(cover)  # [S, R]
            rows[m] = {"ratio": ratio.mean(0).tolist(), "coverage": cover.mean(0).tolist(),
                       "seed_sd": float(ratio.std(0).mean())}
        out["alphas"][float(alpha)] = rows
    return out
