"""Evaluation: the trained router (eq. 6) against baselines and the oracle, offline and live.

Offline, every method is a per-node action array replayed by `env.walk` on the test split's
instances (problem × sampled root), so all are scored on the same generations. Live runs
(`jaxroute.records`) become the same `Outcome` (`records_outcome`) and the same summary. Either
way a method's knob is chosen on the calibration split by one conformal rule
(`conformal_choice`: coverage ≥ 1 − α, decision 68) and reported on the test split.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute import baselines, env, records, references
from jaxroute.core import calibration, threshold
from jaxroute.errors import InputError
from jaxroute.trace import PackedTrees


@dataclasses.dataclass
class Outcome:
    """Per-instance results of one method on a set of instances."""

    correct: np.ndarray  # [N] bool
    cost: np.ndarray  # [N] float
    escalation: np.ndarray  # [N] int decision index of the first escalation, −1 if none
    large_right: np.ndarray  # [N] bool R_M = 1
    problems: np.ndarray  # [N] problem index (for bootstrap by problem)


def solo_outcome(trees: PackedTrees, problems: np.ndarray, model: int) -> Outcome:
    return Outcome(correct=trees.solo_correct[problems, model],
                   cost=trees.solo_cost[problems, model],
                   escalation=np.full(len(problems), -1 if model == 0 else 0),
                   large_right=trees.solo_correct[problems, -1], problems=problems)


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


def summarize(o: Outcome, seed: int = 0) -> dict[str, Any]:
    covered = o.correct | ~o.large_right
    acc = float(o.correct.mean())
    cost = float(o.cost.mean())
    esc = o.escalation >= 0
    lo, hi = bootstrap_ci(covered, o.problems, seed)
    return {
        "accuracy": 100.0 * acc,
        "cost": cost,
        "acc_per_cost": 100.0 * acc / cost if cost > 0 else float("inf"),
        "coverage": float(covered.mean()),
        "coverage_ci": [lo, hi],
        "escalation_rate": float(esc.mean()),
        "mean_escalation_step": float(o.escalation[esc].mean()) if esc.any() else float("nan"),
        "instances": int(len(o.correct)),
    }


def oracle_summary(trees: PackedTrees, problems: np.ndarray, roots: np.ndarray,
                   alpha: float) -> dict[str, dict[str, Any]]:
    """The two oracles on the given instances.

    - "oracle (max accuracy)": the cheapest correct path where one exists, else the cheapest path.
    - "oracle (coverage 1−α)": the cheapest per-instance choice meeting coverage ≥ 1 − α: start from
      every instance's cheapest path and fix the uncovered ones (large right, cheapest wrong) with
      the smallest extra cost until the target holds (unit values ⇒ greedy by cost is optimal).
    """
    oc = baselines.oracle_costs(trees.subset(problems))
    j = np.arange(len(problems))
    cheap, cheap_ok = oc.cheapest[j, roots], oc.cheapest_is_correct[j, roots]
    best_c = oc.cheapest_correct[j, roots]
    large_right = trees.solo_correct[problems, -1]
    solvable = np.isfinite(best_c)
    max_acc = Outcome(correct=solvable | cheap_ok, cost=np.where(solvable, best_c, cheap),
                      escalation=np.full(len(j), -1), large_right=large_right, problems=problems)
    correct = cheap_ok.copy()
    cost = cheap.copy()
    uncovered = ~cheap_ok & large_right
    need = int(np.ceil((1 - alpha) * len(j))) - int((cheap_ok | ~large_right).sum())
    if need > 0:
        extra = np.where(uncovered & solvable, best_c - cheap, np.inf)
        order = np.argsort(extra)[:need]
        order = order[np.isfinite(extra[order])]
        correct[order] = True
        cost[order] = best_c[order]
    target = Outcome(correct=correct, cost=cost, escalation=np.full(len(j), -1),
                     large_right=large_right, problems=problems)
    out = {"oracle (max accuracy)": summarize(max_acc), "oracle (coverage 1-α)": summarize(target)}
    for v in out.values():
        v["escalation_rate"] = float("nan")  # the oracle is not a stepwise policy
        v["mean_escalation_step"] = float("nan")
    return out


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


GUARANTEES = ("marginal", "pac")


def guarantee(alpha: float, delta: float | None = None, n: int | None = None) -> dict[str, Any]:
    """The record of a guarantee: marginal (δ None: E[miscoverage] ≤ α over calibration draws)
    or PAC (P(miscoverage ≤ α) ≥ 1 − δ), with the calibration size it was met on."""
    out: dict[str, Any] = {"kind": "marginal" if delta is None else "pac", "alpha": alpha,
                           "delta": delta}
    if n is not None:
        out["calibration_problems"] = int(n)
    return out


def describe_guarantee(g: dict[str, Any]) -> str:
    """One line a practitioner reads: what the deployed knob promises."""
    if g.get("kind") == "pac":
        return (f"PAC: with probability ≥ {1 - g['delta']:g} over the calibration draw, "
                f"miscoverage ≤ α = {g['alpha']:g}")
    return f"marginal: expected miscoverage ≤ α = {g['alpha']:g} (over calibration draws)"


def check_calibration_size(n: int, alpha: float, delta: float | None = None,
                           where: str = "the calibration split") -> None:
    """Refuse (`InputError`) a calibration set too small for the guarantee to certify any knob
    value, naming the numbers (`core.min_calibration_size`), before anything is trained."""
    need = calibration.min_calibration_size(alpha, delta)
    if n < need:
        what = (f"a PAC guarantee at α = {alpha:g}, δ = {delta:g}" if delta is not None
                else f"a marginal guarantee at α = {alpha:g}")
        raise InputError(f"{where} has {n} problems; {what} needs at least {need} (even with "
                         "no miscoverage at all nothing smaller can be certified): give more "
                         "calibration problems, a larger α" + (" or δ" if delta is not None
                                                                else ""))


def conformal_choice(errors: np.ndarray, alpha: float, delta: float | None = None
                     ) -> tuple[int, bool]:
    """The one calibration rule of every method (decisions 68, 88): `errors` `[n, G]` in [0, 1]
    are per-problem miscoverages on the calibration split at each knob value, the columns
    ordered from the safest value (escalates most) to the cheapest. Returns the index of the
    cheapest value that passes, and whether any does (if none, index 0: the safest). Errors
    `[R, n, G]` calibrate R sets at once (arrays `[R]` back).

    δ None — marginal: the monotone risk passes conformal risk control
    (`core.conformal_threshold`), E[miscoverage] ≤ α. δ given — PAC: Learn-then-Test
    fixed-sequence testing from the safest value (`core.ltt_threshold`; exact binomial p-values
    for {0, 1} rows, Bentkus' bound for averages over several roots), P(miscoverage ≤ α) ≥ 1 − δ.
    """
    e = jnp.asarray(errors, jnp.float32)
    grid = jnp.arange(e.shape[-1], dtype=jnp.float32)
    if delta is None:
        rule = functools.partial(calibration.conformal_threshold, grid=grid, alpha=alpha)
    else:
        binary = bool(np.all((np.asarray(errors) == 0) | (np.asarray(errors) == 1)))
        rule = functools.partial(calibration.ltt_threshold, grid=grid, alpha=alpha, delta=delta,
                                 binary=binary)
    if e.ndim == 3:  # [R, n, G]: R calibration sets at once (the validity benchmark's re-splits)
        idx, feasible = jax.vmap(rule)(e)
        return np.asarray(idx, int), np.asarray(feasible, bool)
    idx, feasible = rule(e)
    return int(idx), bool(feasible)


@dataclasses.dataclass(frozen=True)
class Family:
    """A routing method with one knob, for calibration: `actions(g)` gives node actions `[P, S, T]`
    for every problem of the trees at knob value g; `grid` lists the values from the safest
    (escalates most) to the cheapest."""

    name: str
    actions: Callable[[Any], np.ndarray]
    grid: Sequence[Any]
    external: str = "no"


def walk_grid(trees: PackedTrees, dev: PackedTrees, family: Family, problems: np.ndarray,
              roots: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, cost, escalation), each `[G, N]`, of the family at every grid value on the given
    instances (grid values walked `chunk` at a time in one vmapped call)."""
    h = env.horizon(trees)
    p_dev, r_dev = jnp.asarray(problems), jnp.asarray(roots)
    out = ([], [], [])
    for i in range(0, len(family.grid), chunk):
        acts = np.stack([family.actions(g)[problems] for g in family.grid[i:i + chunk]])
        if len(acts) < chunk:  # one compiled shape for every chunk
            acts = np.concatenate([acts, np.repeat(acts[-1:], chunk - len(acts), 0)])
        w = _walk_many(dev, p_dev, r_dev, jnp.asarray(acts, jnp.int32), h)
        n = min(chunk, len(family.grid) - i)
        for lst, x in zip(out, (w.correct, w.total_cost, w.escalation), strict=True):
            lst.append(np.asarray(x)[:n])
    return tuple(np.concatenate(x) for x in out)  # type: ignore[return-value]


@dataclasses.dataclass
class FamilyWalks:
    """A family walked at every grid value on the calibration and test instances (α-free: one
    walk serves every α's calibration)."""

    family: Family
    cal_errors: np.ndarray  # [n_cal_problems, G] per-problem miscoverage
    test: tuple[np.ndarray, np.ndarray, np.ndarray]  # (correct, cost, escalation), each [G, N]
    test_problems: np.ndarray  # [N]
    large_right: np.ndarray  # [N] R_M of the test instances


def walk_family(trees: PackedTrees, dev: PackedTrees, family: Family, cal, test=None
                ) -> FamilyWalks:
    """Walk `family` on the calibration instances `cal = (problems, roots)` (and on `test`)."""
    pc, rc = cal
    if len(pc) == 0:
        raise InputError("calibration needs problems in the 'cal' split")
    correct, _, _ = walk_grid(trees, dev, family, pc, rc)
    errors = per_problem(((~correct) & trees.solo_correct[pc, -1][None]).T.astype(float), pc)
    if test is None:
        empty = np.zeros((len(family.grid), 0))
        return FamilyWalks(family, errors, (empty.astype(bool), empty, empty.astype(int)),
                           np.zeros(0, int), np.zeros(0, bool))
    pt, rt = test
    return FamilyWalks(family, errors, walk_grid(trees, dev, family, pt, rt), pt,
                       trees.solo_correct[pt, -1])


@functools.partial(jax.jit, static_argnames="h")
def _walk_many(dev: PackedTrees, problems, roots, actions, h: int) -> env.Walk:
    """`env.walk` of stacked node actions `[G, N, S, T]` in one call (compiled once per shape,
    for every family)."""
    return jax.vmap(lambda a: env.walk(dev, problems, roots, a, h))(actions)


def calibrate_family(trees: PackedTrees, dev: PackedTrees, family: Family, cal, alpha: float,
                     delta: float | None = None) -> tuple[int, bool, np.ndarray]:
    """The knob index chosen on the calibration instances by `conformal_choice`, whether it is
    feasible, and the per-problem errors `[n, G]`."""
    fw = walk_family(trees, dev, family, cal)
    idx, feasible = conformal_choice(fw.cal_errors, alpha, delta)
    return idx, feasible, fw.cal_errors


def report_family(fw: FamilyWalks, alpha: float, seed: int = 0, delta: float | None = None
                  ) -> dict[str, Any]:
    """Calibrate `fw` at α (PAC at δ if given) and report the chosen value on test (with the
    bootstrap CI) and the family's whole test curve (accuracy, cost, coverage per grid value)."""
    idx, feasible = conformal_choice(fw.cal_errors, alpha, delta)
    correct, cost, esc = fw.test
    curve = []
    for j, g in enumerate(fw.family.grid):
        covered = correct[j] | ~fw.large_right
        curve.append({"accuracy": 100.0 * float(correct[j].mean()), "cost": float(cost[j].mean()),
                      "coverage": float(covered.mean()), "threshold": _num(g)})
    row = summarize(Outcome(correct=correct[idx], cost=cost[idx], escalation=esc[idx],
                            large_right=fw.large_right, problems=fw.test_problems), seed)
    row.update(threshold=_num(fw.family.grid[idx]), calibration_feasible=feasible)
    return {"name": fw.family.name, "row": row, "curve": curve, "index": idx}


def evaluate_family(trees: PackedTrees, dev: PackedTrees, family: Family, cal, test, alpha: float,
                    seed: int = 0, delta: float | None = None) -> dict[str, Any]:
    """`walk_family` + `report_family`."""
    return report_family(walk_family(trees, dev, family, cal, test), alpha, seed, delta)


def _num(g) -> float:
    try:
        return float(g)
    except (TypeError, ValueError):
        return float("nan")


def quantile_grid(values: np.ndarray, n: int, descending: bool) -> list[float]:
    """Knob values at `n` quantiles of `values` plus both infinities, ordered for a method that
    escalates below the knob (`descending`: +inf first) or at/above it (−inf first)."""
    qs = np.quantile(values, np.linspace(0, 1, n)) if values.size else np.zeros(0)
    grid = np.unique(np.concatenate([[-np.inf], qs, [np.inf]]))
    return [float(g) for g in (grid[::-1] if descending else grid)]


def train_nodes(trees: PackedTrees) -> np.ndarray:
    """`[P, S, T]` bool: valid nodes of train-split problems (knob grids come from these)."""
    return baselines.node_mask(trees) & (trees.split == 0)[:, None, None]


# -- the methods as families ------------------------------------------------------------------


def router_family(trees: PackedTrees, log_prob_fn: Callable, name: str = "router (ours)",
                  grid_size: int = 201) -> Family:
    """Eq. 6 (Γ, `core.route_rule`) with knob κ: κ from 0 (escalate at the first decision) up
    through quantiles of the policy's escalation scores on train nodes to above their maximum
    (never escalate)."""
    dev = env.to_device(trees)
    sub = env.gather(dev, jnp.arange(trees.num_problems))
    probs = np.exp(np.asarray(env.node_log_probs(log_prob_fn, sub)))
    model = np.broadcast_to(trees.seg_model[..., None], trees.step_cost.shape).astype(np.int32)
    s = threshold.escalation_score(np, probs, model)[train_nodes(trees)]
    top = np.nextafter(np.float32(s.max() if s.size else 1.0), np.float32(2))
    grid = np.unique(np.concatenate([[0.0], np.quantile(s, np.linspace(0, 1, grid_size))
                                     if s.size else [], [top]]))

    def actions(kappa):
        return threshold.route_rule(np, probs, np.float32(kappa), model)

    return Family(name, actions, [float(g) for g in grid])


def threshold_family(trees: PackedTrees, confidence: int, grid_size: int = 201) -> Family:
    conf = trees.features[..., confidence][train_nodes(trees)]
    return Family("confidence threshold",
                  lambda tau: baselines.confidence_threshold(trees, confidence, tau),
                  quantile_grid(conf, grid_size, descending=True))


def steer_family(trees: PackedTrees, steer: baselines.Steer, grid_size: int = 201) -> Family:
    post = baselines.steer_posterior(steer, trees.features)
    return Family("STEER", lambda tau: baselines.escalate_where(trees, post < tau),
                  quantile_grid(post[train_nodes(trees)], grid_size, descending=True))


def random_family(trees: PackedTrees, seed: int, grid_size: int = 101) -> Family:
    """Escalate at each node with probability p; one uniform draw per node for every p, so the
    escalation sets are nested in p."""
    u = np.random.default_rng(seed).random(trees.step_cost.shape)
    return Family("random escalation", lambda p: baselines.escalate_where(trees, u < p),
                  [float(p) for p in np.linspace(1.0, 0.0, grid_size)])


def baseline_families(trees: PackedTrees, feature_names: Sequence[str], seed: int = 0
                      ) -> list[Family]:
    """Random escalation, the confidence threshold and STEER (fitted on the train split), their
    features found by name."""
    names = list(feature_names)
    fams = [random_family(trees, seed)]
    if "confidence" in names:
        fams.append(threshold_family(trees, names.index("confidence")))
        if "step_index" in names:
            fams.append(steer_family(trees, baselines.fit_steer_on_train(trees, names)))
    return fams


def risk_family(trees: PackedTrees, seed: int = 0) -> Family:
    """The risk-to-go classifier reference (decision 69), fitted on train; α-free."""
    scores = references.risk_scores(references.fit_risk_to_go(trees, seed=seed), trees)
    return Family("risk-to-go classifier (reference)",
                  lambda tau: baselines.escalate_where(trees, scores >= tau),
                  quantile_grid(scores[train_nodes(trees)], 201, descending=False))


def table_family(trees: PackedTrees, feature_names: Sequence[str], alpha: float
                 ) -> Family | None:
    """The exact best threshold-table reference at α (decision 69), or None when the trees lack
    its features (confidence, step index, difficulty)."""
    names = list(feature_names)
    if not {"confidence", "step_index", "difficulty"} <= set(names):
        return None
    table = references.fit_threshold_table(trees, names, alpha)
    shifts = list(range(len(table.levels), -len(table.levels) - 1, -1))
    return Family("threshold table (reference)", lambda k: table.actions(trees, k), shifts)


def reference_families(trees: PackedTrees, feature_names: Sequence[str], alpha: float,
                       seed: int = 0) -> list[Family]:
    """The reference policies of `jaxroute.references` (decision 69), fitted on train."""
    table = table_family(trees, feature_names, alpha)
    return [risk_family(trees, seed)] + ([table] if table is not None else [])


def evaluate_all(trees: PackedTrees, routers: dict[str, Callable], alpha: float,
                 feature_names: Sequence[str], seed: int = 0, references: bool = True,
                 delta: float | None = None) -> dict[str, Any]:
    """Every method on the test split at the same guarantee: each knob calibrated on the
    calibration split by `conformal_choice` (coverage ≥ 1 − α; with δ, with probability
    ≥ 1 − δ), then reported on test.

    Args:
      routers: name → `log_prob_fn(features [..., D], model [...]) -> log π [..., K]` of each
        router to evaluate (Γ with κ as its knob), e.g. one per training seed.
      feature_names: the trees' feature names (baselines find theirs by name).
      references: also fit and report the reference policies.

    Returns {"rows": [...], "curves": {method: test curve}, "matched": accuracy-matched costs,
    "guarantee": `guarantee(...)`}. Rows carry `kind` ∈ {single model, router, baseline,
    reference, oracle}.
    """
    dev = env.to_device(trees)
    cal = env.instances(trees, trees.split_indices("cal"))
    test = env.instances(trees, trees.split_indices("test"))
    pt, rt = test
    if len(pt) == 0:
        raise InputError("no usable problems in the 'test' split")
    rows, curves = [], {}
    for m in range(trees.num_models):
        rows.append({"method": f"model {m} only", "external": "–", "kind": "single model",
                     **summarize(solo_outcome(trees, pt, m), seed)})
    fams = [(router_family(trees, fn, name), "router") for name, fn in routers.items()]
    fams += [(f, "baseline") for f in baseline_families(trees, feature_names, seed)]
    if references:
        fams += [(f, "reference") for f in reference_families(trees, feature_names, alpha, seed)]
    for fam, kind in fams:
        res = evaluate_family(trees, dev, fam, cal, test, alpha, seed, delta)
        rows.append({"method": fam.name, "external": fam.external, "kind": kind, **res["row"]})
        curves[fam.name] = res["curve"]
    for name, summary in oracle_summary(trees, pt, rt, alpha).items():
        rows.append({"method": name, "external": "oracle", "kind": "oracle", **summary})
    first_router = next(iter(routers), None)
    return {"rows": rows, "curves": curves,
            "matched": matched_costs(rows, curves, first_router) if first_router else {},
            "guarantee": guarantee(alpha, delta, len(trees.split_indices("cal")))}


def mean_row(rows: Sequence[dict], name: str) -> dict[str, Any]:
    """One row summarising several (e.g. one router per training seed): means of the numeric
    columns, and `cost_sd`, `coverage_sd` — the standard deviations across the rows."""
    out = {"method": name, "external": rows[0]["external"], "kind": rows[0].get("kind")}
    for k, v in rows[0].items():
        if isinstance(v, float | int) and not isinstance(v, bool) and k != "instances":
            out[k] = float(np.mean([r[k] for r in rows]))
    out["coverage_ci"] = [float(np.mean([r["coverage_ci"][i] for r in rows])) for i in (0, 1)]
    out["cost_sd"] = float(np.std([r["cost"] for r in rows]))
    out["coverage_sd"] = float(np.std([r["coverage"] for r in rows]))
    out["threshold"] = float("nan")
    return out


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


def replay_rule(trees: PackedTrees, decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
                problems: np.ndarray, root: int = 0) -> env.Walk:
    """A deterministic routing rule replayed on the trace trees of `problems` `[N]` from root
    `root`: `decide(features [n, D] float32, models [n] int32) -> [n]` models (an exported
    `Router`'s `decide(...).model`) is asked at every node, and `env.walk` follows the answers.
    With coupled sampling (decision 87) this is what a live run of the same rule writes and
    pays, problem by problem (`generation.comparison.replay_agreement` checks it)."""
    problems = np.asarray(problems)
    feats = np.asarray(trees.features)[problems]  # [N, S, T, D]
    model = np.broadcast_to(np.asarray(trees.seg_model)[problems][..., None],
                            feats.shape[:-1]).astype(np.int32)
    chosen = np.asarray(decide(feats.reshape(-1, feats.shape[-1]), model.reshape(-1)),
                        np.int32).reshape(model.shape)
    return env.walk(env.to_device(trees), jnp.asarray(problems, jnp.int32),
                    jnp.full(len(problems), root, jnp.int32), jnp.asarray(chosen),
                    env.horizon(trees))


# ------------------------------------------------------------------------------------------------
# Live runs (records of `generation.online.run_online`, see `jaxroute.records`)


def records_outcome(recs: Sequence[dict], large_right: dict[str, bool],
                    models: Sequence, cost_model: str) -> Outcome:
    """The `Outcome` of a live run; R_M per problem id from `large_right`. The escalation index
    is the first piece that model 0 did not keep (a discarded draft, or a larger model's)."""
    pids = sorted({r["problem_id"] for r in recs})
    index = {p: i for i, p in enumerate(pids)}
    esc = []
    for r in recs:
        first = [i for i, p in enumerate(r["pieces"]) if not p.get("kept", True)
                 or p["model"] != 0]
        esc.append(first[0] if first else -1)
    return Outcome(correct=np.array([r["correct"] for r in recs], bool),
                   cost=np.array([records.record_cost(r, models, cost_model) for r in recs]),
                   escalation=np.array(esc),
                   large_right=np.array([large_right[r["problem_id"]] for r in recs], bool),
                   problems=np.array([index[r["problem_id"]] for r in recs]))


def summarize_records(recs: Sequence[dict], large_right: dict[str, bool], models: Sequence,
                      cost_model: str, seed: int = 0) -> dict[str, Any]:
    """`summarize` of a live run, plus the scorer column (its mean per problem) and the share of
    generated tokens that were discarded drafts."""
    row = summarize(records_outcome(recs, large_right, models, cost_model), seed)
    row["scorer_cost"] = float(np.mean([records.scorer_cost(r, cost_model) for r in recs]))
    gen = sum(p["cost"]["output_tokens"] for r in recs for p in r["pieces"])
    dropped = sum(p["cost"]["output_tokens"] for r in recs for p in r["pieces"]
                  if not p.get("kept", True))
    row["discarded_token_share"] = dropped / gen if gen else 0.0
    return row
