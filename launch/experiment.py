"""The main job on the embedded default: tiny LMs → trace trees → router → evaluation → export.

    python -m launch.experiment            # defaults: runs/experiment, minutes on 2 CPU cores
    python -m launch.experiment --engine=vllm   # the same weights in a real vLLM engine

1. generates trace trees for the procedural arithmetic task with the two built-in tiny LMs
   (stepwise, real logits; the rule-based step verifier stands in for the LLM verifier);
2. trains the router (the default exact-gradient trainer, decision 67) for 3 seeds, calibrates
   κ on the calibration split, and exports the first seed's router; trains the paper-faithful
   TCPO (batch 5) as its own row;
3. evaluates every method at the same guarantee — each knob calibrated on the calibration split
   by the same conformal rule to coverage ≥ 1 − α (decision 68) — on the test split: the
   routers, random escalation, the confidence threshold, STEER, the reference policies and the
   oracle (replayed on the trace trees);
4. runs the large model alone and the exported router live — with coupled samples (decision 87)
   the first is the trees' R_M sample (coverage 1) and the second must write and pay what its
   replay on the trees says ("offline replay vs live: N/N problems identical") — next to the
   per-step baselines that cannot be replayed: RSD (the stand-in tiny PRM) and SpecReason (the
   stand-in tiny judge), their thresholds calibrated on the paired R_M by the same rule over the
   0.1 grid refined near 1 (`baselines.SCORE_GRID`), all grid points in one engine
   (`generation.live.comparison.compare_live`);
5. writes report/ (table.md, table.json, accuracy_cost.png, config.json with wall, CPU and JAX
   compile seconds and peak resident memory per stage, timing.json).
Every stage is resumable: re-running continues where it stopped — trace generation at the
chunk in flight, training at its last checkpoint, the online stage at the method in flight
(finished methods' runs are kept in online/runs; a thresholded family's grid is one run).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import flags

from generation import main_job
from generation.traces import answers
from jaxroute import core, exact, guarantee, suite, trace, traceset, trainer
from jaxroute.durable import atomic_write_text, exclusive, strict_json
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/experiment, "
                               "runs/experiment_vllm with --engine=vllm).")
_N = flags.DEFINE_list("problems", ["400", "150", "250"], "Problems in train, cal, test.")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", exact.ExactConfig.iterations,
                              "Router training iterations.")
_SEEDS = flags.DEFINE_integer("train_seeds", 3, "Routers trained (reported as mean ± sd).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for problems, sampling and the first router.")
_ENGINE = flags.DEFINE_enum("engine", "jax", list(main_job.ENGINES), "Engine of the tiny LMs: "
                            "jax (built in) or vllm (the same weights exported and run by a real "
                            "vLLM engine; needs the real-engine environment, README).")
_ONLINE = flags.DEFINE_bool("online", True, "Run the online stage (router live, RSD, SpecReason).")
_REFERENCE = flags.DEFINE_bool("reference", None, "Report the perfect-risk reference (16 fresh "
                               "rollouts per node and model; cached per trace set, the default "
                               "set's committed). Default: on with the JAX engine, off with vLLM "
                               "(its rollouts take tens of minutes on a CPU).")
_DELTA = common.define_guarantee_flags()
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Keep compiled JAX executables on disk "
                           "(WORKDIR/jax_cache): a stage recompiling a shape an earlier one "
                           "dropped reads it back (decision 96).")

UNIT = "FLOPs ×1e6"
common.check_flags(alpha=(common.probability, "in (0, 1)"),
                   iterations=(lambda v: v >= 0, "≥ 0"), train_seeds=(common.positive, "≥ 1"),
                   problems=(lambda v: len(v) == 3 and all(x.isdigit() and int(x) > 0
                                                           for x in v),
                             "three positive counts (train, cal, test)"))


def main(argv):
    del argv
    common.large_blocks_outside_the_heap()
    work = Path(_WORKDIR.value or default_workdir(_ENGINE.value, _DELTA()))
    with exclusive(work):  # one run per workdir at a time (decision 78)
        if _CACHE.value:
            common.compilation_cache(work / "jax_cache")
        run(work, _SEED.value, _ALPHA.value, _DELTA())


def default_workdir(engine: str, delta: float | None) -> str:
    """runs/experiment, with _vllm for the vLLM engine and _pac for the PAC guarantee."""
    return ("runs/experiment" + ("" if engine == "jax" else f"_{engine}")
            + ("" if delta is None else "_pac"))


def run(work: Path, seed: int, alpha: float, delta: float | None = None) -> None:
    clock = common.StageClock()
    memory = {}  # peak resident memory after each stage (MB)
    sizes = dict(zip(main_job.SPLIT_NAMES, map(int, _N.value), strict=True))
    # An impossible guarantee stops here, before any generation or training (decision 88).
    guarantee.check_calibration_size(sizes["cal"], alpha, delta, where="--problems' cal count")
    pac_delta = delta if delta is not None else 0.1
    print(f"      guarantee: {guarantee.describe_guarantee(guarantee.guarantee(alpha, delta))}; "
          f"{sizes['cal']} calibration problems (the least on which anything can be certified "
          f"at α = {alpha:g}: marginal {core.min_calibration_size(alpha)}, PAC at δ = "
          f"{pac_delta:g} {core.min_calibration_size(alpha, pac_delta)})")
    problems, splits = main_job.problems_and_splits(sizes, seed)
    backends, *scorers = main_job.models(_ENGINE.value, work, seed)
    print(f"[1/5] trace trees: {len(problems)} problems, models "
          f"{[f'{b.name} ({b.params:,.0f} params)' for b in backends]}")
    with answers.AnswerChecker(workers=2) as checker:
        main_job.make_trace_set(backends, problems, splits, work / "traces", seed, checker)
    manifest, recs = traceset.load_trace_set(work / "traces")
    trees = trace.pack(manifest, recs, "mflops")
    clock.mark("traces")
    memory["traces"] = common.peak_rss_mb()
    common.release_memory()
    print(f"[2/5] training the router (α = {alpha}, {_SEEDS.value} seeds) and the paper's TCPO")
    cfg = exact.ExactConfig(alpha=alpha, iterations=_ITERS.value)
    seeds = tuple(range(seed, seed + _SEEDS.value))
    fit = trainer.train_and_export(trees, manifest,
                                   trainer.TrainConfig(cfg, seeds=seeds, delta=delta),
                                   work / "train", source=str(work / "traces"),
                                   cost_model="mflops", router_dir=work / "router")
    paper = trainer.train(trees, dataclasses.replace(suite.paper_config(alpha, (seed,)),
                                                     delta=delta))
    memory["train"] = common.peak_rss_mb()
    common.release_memory()
    print(f"      κ per seed {[f'{k:.4g}' for k in fit.kappas]}; {clock.mark('train'):.0f} s")
    print("[3/5] every method at the same guarantee on the test split; the perfect-risk "
          f"reference from {main_job.RISK_ROLLOUTS} fresh rollouts per node and model (computed "
          "once per trace set, then cached)")
    reference = _REFERENCE.value if _REFERENCE.value is not None else _ENGINE.value == "jax"
    gain = main_job.risk_gain(backends, trees, recs, problems, seed,
                              cache=work / "traces" / "perfect_risk.npz") if reference else None
    clock.mark("reference")
    result = main_job.offline_result(trees, manifest, fit, paper, alpha, seed, delta, gain)
    clock.mark("evaluate")
    memory["evaluate"] = common.peak_rss_mb()
    common.release_memory()
    if _ONLINE.value:
        print("[4/5] online: the exported router, RSD and SpecReason, live on the test split")
        main_job.live_result(result, work, manifest, recs, trees, backends, scorers, problems,
                             splits, alpha, seed, between=common.release_memory, delta=delta)
        rep = result["replay"]
        print(f"      offline replay vs live: {rep['identical']}/{rep['problems']} problems "
              "identical" + "".join(f"\n        {d['problem_id']}: {d['cause']}"
                                    for d in rep["disagreements"]))
    memory["online"] = common.peak_rss_mb()
    print(f"      {clock.mark('online'):.0f} s")
    print("[5/5] report")
    times = clock.totals()
    engine = "" if _ENGINE.value == "jax" else f" on the {_ENGINE.value} engine"
    kind = "marginal" if delta is None else f"PAC, δ = {delta:g}"
    title = (f"Embedded default (tiny LMs{engine}, arithmetic task) — test split, α = {alpha} "
             f"({kind})")
    config = {"problems": sizes, "alpha": alpha, "delta": delta,
              "source": main_job.embedded_source(),
              "guarantee": result["guarantee"], "engine": _ENGINE.value,
              "router": dataclasses.asdict(cfg),
              "train_seeds": list(seeds), "kappas": fit.kappas, "seed": seed,
              "models": {b.name: b.params for b in backends}, **times,
              "peak_rss_mb": memory}
    report.write_report(work / "report", result, UNIT, title, config)
    print(report.markdown_table(result["rows"], UNIT, title) + report.guarantee_line(result)
          + report.matched_line(result, UNIT) + report.replay_line(result))
    atomic_write_text(work / "report" / "timing.json", strict_json(times) + "\n")
    print("      " + "; ".join(f"{k.replace('_', ' ')}: " + ", ".join(
        f"{s} {v:.0f}" for s, v in t.items()) for k, t in times.items()))
    print(f"done in {times['seconds']['total']:.0f} s; report in {work / 'report'}")


if __name__ == "__main__":
    common.run(main)
