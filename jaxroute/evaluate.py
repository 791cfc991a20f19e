"""Evaluation: the trained router (eq. 6) against baselines and the oracle, offline and live.

Offline, every method is a per-node action array replayed by `env.walk` on the test split's
instances (problem × sampled root), so all are scored on the same generations. Live runs
(`jaxroute.records`) become the same `Outcome` (`records_outcome`) and the same summary. Either
way a method's knob is chosen on the calibration split by the one calibration rule
(`guarantee.conformal_choice`, decisions 68, 88) and reported on the test split. The methods'
families are built beside their definitions; this module only evaluates and summarises them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxroute import baselines, env, records
from jaxroute import references as references_lib
from jaxroute.errors import InputError
from jaxroute.guarantee import Family, FamilyWalks, conformal_choice, guarantee, walk_family
from jaxroute.learner import router_family
from jaxroute.stats import bootstrap_ci, matched_costs
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


# Both know the realised samples (which continuation will fail), so no router can approach
# them; the perfect-risk reference (`references.perfect_risk_family`) is the reachable limit.
ORACLES = ("hindsight oracle (max accuracy, knows the samples)",
           "hindsight oracle (coverage 1-α, knows the samples)")


def oracle_summary(trees: PackedTrees, problems: np.ndarray, roots: np.ndarray,
                   alpha: float) -> dict[str, dict[str, Any]]:
    """The two oracles on the given instances.

    - `ORACLES[0]`: the cheapest correct path where one exists, else the cheapest path.
    - `ORACLES[1]`: the cheapest per-instance choice meeting coverage ≥ 1 − α: start from
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
    out = {ORACLES[0]: summarize(max_acc), ORACLES[1]: summarize(target)}
    for v in out.values():
        v["escalation_rate"] = float("nan")  # the oracle is not a stepwise policy
        v["mean_escalation_step"] = float("nan")
    return out


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
    return float(g) if isinstance(g, int | float | np.number) else float("nan")


def evaluate_all(trees: PackedTrees, routers: dict[str, Callable], alpha: float,
                 feature_names: Sequence[str], seed: int = 0, references: bool = True,
                 delta: float | None = None, more: Sequence[Family] = ()) -> dict[str, Any]:
    """Every method on the test split at the same guarantee: each knob calibrated on the
    calibration split by `conformal_choice` (coverage ≥ 1 − α; with δ, with probability
    ≥ 1 − δ), then reported on test.

    Args:
      routers: name → `log_prob_fn(features [..., D], model [...]) -> log π [..., K]` of each
        router to evaluate (Γ with κ as its knob), e.g. one per training seed.
      feature_names: the trees' feature names (baselines find theirs by name).
      references: also fit and report the reference policies.
      more: further reference families (e.g. the perfect-risk reference from rollouts).

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
    fams += [(f, "baseline") for f in baselines.baseline_families(trees, feature_names, seed)]
    fams += [(f, "reference") for f in more]
    if references:
        fams += [(f, "reference") for f in
                 references_lib.reference_families(trees, feature_names, alpha, seed)]
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


def replay_rule(trees: PackedTrees, decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
                problems: np.ndarray, root: int = 0) -> env.Walk:
    """A deterministic routing rule replayed on the trace trees of `problems` `[N]` from root
    `root`: `decide(features [n, D] float32, models [n] int32) -> [n]` models (an exported
    `Router`'s `decide(...).model`) is asked at every node, and `env.walk` follows the answers.
    With coupled sampling (decision 87) this is what a live run of the same rule writes and
    pays, problem by problem (`generation.live.comparison.replay_agreement` checks it)."""
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
# Live runs (records of `generation.live.online.run_online`, see `jaxroute.records`)


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
