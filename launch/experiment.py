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
4. runs the exported router live, next to the per-step baselines that cannot be replayed — RSD
   (the stand-in tiny PRM) and SpecReason (the stand-in tiny judge), their thresholds calibrated
   by the same rule over the 0.1 grid (`generation.comparison.compare_live`);
5. writes report/ (table.md, table.json, accuracy_cost.png, config.json with wall time and peak
   resident memory per stage, timing.json).
Every stage is resumable: re-running continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from absl import flags

from generation import answers
from generation.tinylm import embedded
from jaxroute import exact, suite, trace, trainer
from jaxroute.durable import atomic_write_text, exclusive
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/experiment, "
                               "runs/experiment_vllm with --engine=vllm).")
_N = flags.DEFINE_list("problems", ["400", "150", "250"], "Problems in train, cal, test.")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", exact.ExactConfig.iterations,
                              "Router training iterations.")
_SEEDS = flags.DEFINE_integer("train_seeds", 3, "Routers trained (reported as mean ± sd).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for problems, sampling and the first router.")
_ENGINE = flags.DEFINE_enum("engine", "jax", list(embedded.ENGINES), "Engine of the tiny LMs: "
                            "jax (built in) or vllm (the same weights exported and run by a real "
                            "vLLM engine; needs the real-engine environment, README).")
_ONLINE = flags.DEFINE_bool("online", True, "Run the online stage (router live, RSD, SpecReason).")

UNIT = "FLOPs ×1e6"
common.check_flags(alpha=(common.probability, "in (0, 1)"),
                   iterations=(lambda v: v >= 0, "≥ 0"), train_seeds=(common.positive, "≥ 1"),
                   problems=(lambda v: len(v) == 3 and all(x.isdigit() and int(x) > 0
                                                           for x in v),
                             "three positive counts (train, cal, test)"))


def main(argv):
    del argv
    common.large_blocks_outside_the_heap()
    work = Path(_WORKDIR.value or ("runs/experiment" if _ENGINE.value == "jax"
                                   else f"runs/experiment_{_ENGINE.value}"))
    with exclusive(work):  # one run per workdir at a time (decision 78)
        run(work, _SEED.value, _ALPHA.value)


def run(work: Path, seed: int, alpha: float) -> None:
    clock = {"start": time.perf_counter()}
    memory = {}  # peak resident memory after each stage (MB)
    sizes = dict(zip(embedded.SPLIT_NAMES, map(int, _N.value), strict=True))
    problems, splits = embedded.problems_and_splits(sizes, seed)
    backends, *scorers = embedded.models(_ENGINE.value, work, seed)
    print(f"[1/5] trace trees: {len(problems)} problems, models "
          f"{[f'{b.name} ({b.params:,.0f} params)' for b in backends]}")
    with answers.AnswerChecker(workers=2) as checker:
        embedded.make_trace_set(backends, problems, splits, work / "traces", seed, checker)
    manifest, recs = trace.load_trace_set(work / "traces")
    trees = trace.pack(manifest, recs, "mflops")
    clock["traces"] = time.perf_counter()
    memory["traces"] = common.peak_rss_mb()
    common.release_memory()
    print(f"[2/5] training the router (α = {alpha}, {_SEEDS.value} seeds) and the paper's TCPO")
    cfg = exact.ExactConfig(alpha=alpha, iterations=_ITERS.value)
    seeds = tuple(range(seed, seed + _SEEDS.value))
    fit = trainer.train_and_export(trees, manifest, trainer.TrainConfig(cfg, seeds=seeds),
                                   work / "train", source=str(work / "traces"),
                                   cost_model="mflops", router_dir=work / "router")
    paper = trainer.train(trees, suite.paper_config(alpha, (seed,)))
    clock["train"] = time.perf_counter()
    memory["train"] = common.peak_rss_mb()
    common.release_memory()
    print(f"      κ per seed {[f'{k:.4g}' for k in fit.kappas]}; "
          f"{clock['train'] - clock['traces']:.0f} s")
    print("[3/5] every method at the same guarantee on the test split")
    result = embedded.offline_result(trees, manifest, fit, paper, alpha, seed)
    clock["evaluate"] = time.perf_counter()
    memory["evaluate"] = common.peak_rss_mb()
    common.release_memory()
    if _ONLINE.value:
        print("[4/5] online: the exported router, RSD and SpecReason, live on the test split")
        embedded.live_result(result, work, manifest, recs, backends, scorers, problems, splits,
                             alpha, seed, between=common.release_memory)
    clock["online"] = time.perf_counter()
    memory["online"] = common.peak_rss_mb()
    print(f"      {clock['online'] - clock['evaluate']:.0f} s")
    print("[5/5] report")
    seconds = {k: round(clock[k] - clock[p], 1) for p, k in
               (("start", "traces"), ("traces", "train"), ("evaluate", "online"))}
    seconds["total"] = round(time.perf_counter() - clock["start"], 1)
    engine = "" if _ENGINE.value == "jax" else f" on the {_ENGINE.value} engine"
    title = f"Embedded default (tiny LMs{engine}, arithmetic task) — test split, α = {alpha}"
    config = {"problems": sizes, "alpha": alpha, "engine": _ENGINE.value, "router": dataclasses.asdict(cfg),
              "train_seeds": list(seeds), "kappas": fit.kappas, "seed": seed,
              "models": {b.name: b.params for b in backends}, "seconds": seconds,
              "peak_rss_mb": memory}
    report.write_report(work / "report", result, UNIT, title, config)
    print(report.markdown_table(result["rows"], UNIT, title) + report.matched_line(result, UNIT))
    atomic_write_text(work / "report" / "timing.json", json.dumps(seconds) + "\n")
    print(f"done in {seconds['total']:.0f} s; report in {work / 'report'}")


if __name__ == "__main__":
    common.run(main)
