"""The routing benchmark: every method at the same guarantee, across routing worlds and seeds.

A *world* is a family of trace trees (synthetic families varying the small model's coverage and
the confidence feature's quality, K = 2 and K = 3; the embedded tiny-LM trees come from the
caller, since this package does not generate with language models). For each world, data seed
and α, every method's knob is calibrated on the calibration split by the one conformal rule
(`guarantee.conformal_choice`, decision 68) and reported on the test split:

- the router (the exact learner, the default) and the paper-faithful TCPO (batch 5, the paper's
  settings), both trained by `trainer.train`, one row per training seed;
- the baselines: random escalation, the confidence threshold, STEER;
- the references (`jaxroute.references`): the risk-to-go classifier and the threshold table;
- the hindsight oracle at coverage 1 − α, the floor.

`run_world` returns one record per (α, method, training seed); `aggregate` turns them into the
table's rows (means ± standard deviations over seeds) and the targets' verdicts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxroute import (
    baselines,
    env,
    evaluate,
    exact,
    guarantee,
    learner,
    references,
    synthetic,
    tcpo,
    trace,
    trainer,
    validity,
)

ROUTER = "router (exact CPO, ours)"
PAPER = "TCPO (paper settings)"
BASELINES = ("random escalation", "confidence threshold", "STEER")
REFERENCES = ("risk-to-go classifier (reference)", "threshold table (reference)")
PERFECT = references.PERFECT_RISK  # a limit, not a policy from features: not a "best ref."
ORACLE = evaluate.ORACLES[1]


@dataclasses.dataclass(frozen=True)
class World:
    name: str
    small_coverage: float = 0.75  # synthetic knobs (ignored for trees given by the caller)
    auroc: float = 0.75
    num_models: int = 2
    synthetic: bool = True


WORLDS = (
    World("cov 0.60, AUROC 0.75", 0.60, 0.75),
    World("cov 0.75, AUROC 0.75", 0.75, 0.75),
    World("cov 0.90, AUROC 0.75", 0.90, 0.75),
    World("cov 0.75, AUROC 0.60", 0.75, 0.60),
    World("cov 0.75, AUROC 0.90", 0.75, 0.90),
    World("K=3, cov 0.75, AUROC 0.75", 0.75, 0.75, 3),
    World("embedded tiny LMs", synthetic=False),
)
QUICK_WORLDS = ("cov 0.75, AUROC 0.75", "embedded tiny LMs")

# Trainer ideas measured against the default (`--ablation`, decision 70): ExactConfig overrides.
ABLATIONS = {
    "CG 1 iteration, 60 iterations": dict(cg_iters=1, iterations=60),
    "line-search slack 0.1α, 60 iterations": dict(constraint_tol=0.1, iterations=60),
    "trust region δ = 0.01 (the paper's)": dict(max_kl=0.01),
    "trained for 1.5α": dict(alpha_scale=1.5),
    "trained for 0.75α": dict(alpha_scale=0.75),
    "hidden 32×32": dict(hidden=(32, 32)),
    "Lagrangian: Adam 3e-3 + dual ascent, 400 it.": dict(optimizer="lagrangian",
                                                          iterations=400),
    "mini-batch 128 problems": dict(batch_size=128),
}


def synthetic_world(world: World, data_seed: int, sizes: tuple[int, int, int] | None = None
                    ) -> tuple[trace.Manifest, trace.PackedTrees]:
    """A synthetic world's trace set (FLOPs in 1e12): 800 problems of at most 12 steps; for
    K = 3 (a tree has a middle-model segment under every step) 600 of at most 8, which keeps
    its exact training within the benchmark's time. `sizes`: (train, cal, test) problems
    instead (the validity check's large pools)."""
    k3 = world.num_models == 3
    n = sum(sizes) if sizes else 600 if k3 else 800
    fractions = tuple(x / n for x in sizes) if sizes else (0.5, 0.2, 0.3)
    cfg = synthetic.family_config(world.small_coverage, world.auroc, world.num_models,
                                  seed=1000 + data_seed, num_problems=n,
                                  max_steps=8 if k3 else 12, split_fractions=fractions)
    return synthetic.generate_packed(cfg, "flops")


def paper_config(alpha: float, seeds=(0,)) -> trainer.TrainConfig:
    """The paper's TCPO settings (Sec. 5.1): batch 5, 1000 iterations, the rest as decided; κ
    calibrated afterwards like every method's knob (by the evaluation)."""
    return trainer.TrainConfig(tcpo.TCPOConfig(alpha=alpha, iterations=1000, batch_size=5),
                               seeds=tuple(seeds), chunk=1000, final_calibration=False)


def run_world(world: str, data_seed: int, manifest: trace.Manifest, trees: trace.PackedTrees,
              alphas: Sequence[float], train_seeds: Sequence[int],
              exact_config: exact.ExactConfig | None = None, paper: bool = True,
              variants: dict[str, dict] | None = None, baselines_too: bool = True,
              gain: np.ndarray | None = None,
              log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Every method on one world's trees, at every α; one record per (α, method, seed).
    `variants`: extra router rows trained with these `ExactConfig` overrides (an ablation).
    `gain` `[P, S, T]`: the nodes' estimated coverage gains from fresh rollouts
    (`generation.main_job.risk_gain`), for the perfect-risk reference (worlds with models)."""
    names = list(manifest.feature_names)
    dev = env.to_device(trees)
    cal = env.instances(trees, trees.split_indices("cal"))
    test = env.instances(trees, trees.split_indices("test"))
    pt, rt = test
    large = float(np.mean(trees.solo_cost[pt, -1]))
    small_cov = float(np.mean(trees.solo_correct[pt, 0] | ~trees.solo_correct[pt, -1]))
    out: list[dict[str, Any]] = []

    def record(alpha, method, kind, res, train_seed=None, seconds=None):
        r = res["row"]
        out.append({"world": world, "data_seed": data_seed, "alpha": alpha, "method": method,
                    "kind": kind, "train_seed": train_seed, "coverage": r["coverage"],
                    "coverage_ci": r["coverage_ci"], "accuracy": r["accuracy"],
                    "cost": r["cost"], "cost_large": r["cost"] / large,
                    "escalation_rate": r["escalation_rate"], "threshold": r.get("threshold"),
                    "feasible": r.get("calibration_feasible", True), "large_cost": large,
                    "small_coverage": small_cov, "seconds": seconds})

    t0 = time.perf_counter()
    shared = [guarantee.walk_family(trees, dev, f, cal, test)
              for f in baselines.baseline_families(trees, names, data_seed)]
    shared.append(guarantee.walk_family(trees, dev, references.risk_family(trees, data_seed), cal,
                                       test))  # the α-free reference: fitted and walked once
    if gain is not None:
        shared.append(guarantee.walk_family(trees, dev, references.perfect_risk_family(trees, gain),
                                            cal, test))
    log(f"  {world} / data {data_seed}: baselines walked ({time.perf_counter() - t0:.0f} s)")
    for alpha in alphas:
        for fw in shared:
            kind = ("reference" if fw.family.name in REFERENCES else
                    "limit" if fw.family.name == PERFECT else "baseline")
            record(alpha, fw.family.name, kind, evaluate.report_family(fw, alpha))
        t1 = time.perf_counter()
        table = references.table_family(trees, names, alpha)
        if table is not None:
            record(alpha, REFERENCES[1], "reference",
                   evaluate.evaluate_family(trees, dev, table, cal, test, alpha),
                   seconds=time.perf_counter() - t1)
        base = dataclasses.replace(exact_config or exact.ExactConfig(), alpha=alpha)
        for name, over in [(ROUTER, {})] + [(f"variant: {k}", v)
                                            for k, v in (variants or {}).items()]:
            t1 = time.perf_counter()
            res = trainer.train(trees, trainer.TrainConfig(
                dataclasses.replace(base, **over), seeds=tuple(train_seeds),
                final_calibration=False))
            secs = (time.perf_counter() - t1) / len(train_seeds)
            for i, s in enumerate(train_seeds):
                fam = learner.router_family(trees, res.log_prob_fn(i), name)
                record(alpha, name, "router" if name == ROUTER else "variant",
                       evaluate.evaluate_family(trees, dev, fam, cal, test, alpha), s, secs)
        if paper:
            t1 = time.perf_counter()
            res = trainer.train(trees, paper_config(alpha, train_seeds))
            secs = (time.perf_counter() - t1) / len(train_seeds)
            for i, s in enumerate(train_seeds):
                fam = learner.router_family(trees, res.log_prob_fn(i), PAPER)
                record(alpha, PAPER, "paper", evaluate.evaluate_family(trees, dev, fam, cal, test,
                                                                       alpha), s, secs)
        oracle = evaluate.oracle_summary(trees, pt, rt, alpha)[ORACLE]
        record(alpha, ORACLE, "oracle", {"row": oracle})
        log(f"  {world} / data {data_seed} / α {alpha}: done ({time.perf_counter() - t0:.0f} s)")
    return out


VALIDITY_METHODS = (ROUTER, *BASELINES)


def validity_world(world: str, manifest: trace.Manifest, trees: trace.PackedTrees,
                   alphas: Sequence[float], delta: float, calibration: int, resplits: int,
                   seed: int = 0, exact_config: exact.ExactConfig | None = None,
                   log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """The validity check (`jaxroute.validity`) of both guarantees on one world: the router
    (trained once per α on the train split, never again) and the baselines, each walked once on
    the pool (the cal and test splits together), then `resplits` random calibration sets of
    `calibration` problems from the pool. One record per (α, method, guarantee)."""
    names = list(manifest.feature_names)
    pool = np.concatenate([trees.split_indices("cal"), trees.split_indices("test")])
    large = float(np.mean(trees.solo_cost[pool, -1]))
    t0 = time.perf_counter()
    fixed = {f.name: validity.pool_outcomes(trees, f, pool)
             for f in baselines.baseline_families(trees, names, seed)}
    out: list[dict[str, Any]] = []
    for alpha in alphas:
        res = trainer.train(trees, trainer.TrainConfig(
            dataclasses.replace(exact_config or exact.ExactConfig(), alpha=alpha), seeds=(seed,),
            final_calibration=False))
        outcomes = {ROUTER: validity.pool_outcomes(
            trees, learner.router_family(trees, res.log_prob_fn(0), ROUTER), pool), **fixed}
        for method, (errors, cost) in outcomes.items():
            for d in (None, delta):
                r = validity.resplit(errors, cost, alpha, d, calibration, resplits, seed)
                summary = validity.summarize(r, alpha, d, len(pool) - calibration)
                out.append({"world": world, "alpha": alpha, "method": method,
                            "guarantee": "marginal" if d is None else "pac", "delta": d,
                            "calibration": calibration, **summary,
                            "cost_large": summary["cost"] / large})
        log(f"  {world} / α {alpha}: {resplits} re-splits of {len(pool)} problems "
            f"({time.perf_counter() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------
# Aggregation and targets


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows per (world, α, method): means and standard deviations over every seed (the
    training seeds within each data seed, and the data seeds), cost ratios against large-only,
    the best reference and the oracle of the same data seed, and the share of runs whose
    coverage CI reaches 1 − α."""
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault((r["world"], r["alpha"], r["method"]), []).append(r)
    floor = {}  # (world, α, data seed) → best reference cost / oracle cost
    for (w, a, m), rs in by_key.items():
        for r in rs:
            key = (w, a, r["data_seed"])
            if m in REFERENCES:
                floor.setdefault(key, {})
                floor[key]["ref"] = min(floor[key].get("ref", np.inf), r["cost"])
            if m == ORACLE:
                floor.setdefault(key, {})["oracle"] = r["cost"]
            if m == PERFECT:
                floor.setdefault(key, {})["perfect"] = r["cost"]
    rows = []
    for (w, a, m), rs in by_key.items():
        cost = np.array([r["cost_large"] for r in rs])
        ref = np.array([r["cost"] / floor[(w, a, r["data_seed"])].get("ref", np.nan)
                        for r in rs])
        orc, per = (np.array([r["cost"] / floor[(w, a, r["data_seed"])].get(k, np.nan)
                              for r in rs]) for k in ("oracle", "perfect"))
        within = np.mean([r["coverage_ci"][1] >= 1 - a for r in rs])
        seeds_sd = _within_data_seed_sd(rs)
        rows.append({"world": w, "alpha": a, "method": m, "kind": rs[0]["kind"], "runs": len(rs),
                     "coverage": float(np.mean([r["coverage"] for r in rs])),
                     "coverage_sd": float(np.std([r["coverage"] for r in rs])),
                     "ci_reaches_target": float(within),
                     "cost_large": float(cost.mean()), "cost_large_sd": float(cost.std()),
                     "cost_reference": float(np.nanmean(ref)), "cost_oracle": float(np.nanmean(orc)),
                     "cost_perfect": float(np.nanmean(per)) if np.isfinite(per).any() else None,
                     "train_seed_sd": seeds_sd})
    order = {m: i for i, m in enumerate((ROUTER, PAPER, *BASELINES, *REFERENCES, PERFECT,
                                         ORACLE))}
    return sorted(rows, key=lambda r: (r["world"], r["alpha"], order.get(r["method"], 99)))


def _within_data_seed_sd(rs) -> float:
    """Mean over data seeds of the training-seed standard deviation of cost, relative to the
    mean cost (nan for methods without training seeds)."""
    groups: dict[int, list[float]] = {}
    for r in rs:
        if r["train_seed"] is not None:
            groups.setdefault(r["data_seed"], []).append(r["cost"])
    vals = [np.std(v) / np.mean(v) for v in groups.values() if len(v) > 1 and np.mean(v) > 0]
    return float(np.mean(vals)) if vals else float("nan")


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The router's verdicts per (world, α): coverage CI reaches 1 − α in ≥ 95 % of runs; mean
    cost ≤ the cheapest calibrated baseline's; ≤ 1.05× the best reference; training-seed sd ≤ 5 %
    of the mean."""
    out = []
    keys = sorted({(r["world"], r["alpha"]) for r in rows})
    for w, a in keys:
        sel = {r["method"]: r for r in rows if r["world"] == w and r["alpha"] == a}
        if ROUTER not in sel:
            continue
        me = sel[ROUTER]
        base = min(sel[b]["cost_large"] for b in BASELINES if b in sel)
        refs = [sel[x]["cost_large"] for x in REFERENCES if x in sel]
        best_ref = min(refs) if refs else float("nan")
        out.append({"world": w, "alpha": a,
                    "coverage_ok": me["ci_reaches_target"] >= 0.95,
                    "beats_baselines": me["cost_large"] <= base + 1e-12,
                    "vs_reference": me["cost_large"] / best_ref,
                    "reference_ok": me["cost_large"] <= 1.05 * best_ref,
                    "seed_sd": me["train_seed_sd"], "seed_sd_ok": me["train_seed_sd"] <= 0.05,
                    "router": me["cost_large"], "best_baseline": base, "best_reference": best_ref})
    return out
