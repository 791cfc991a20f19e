"""The main job on the embedded default: tiny LMs → trace trees → router → evaluation → export.

    python -m launch.experiment            # defaults: runs/experiment, ~minutes on 2 CPU cores

1. generates trace trees for the procedural arithmetic task with the two built-in tiny LMs
   (stepwise, real logits; the rule-based step verifier stands in for the LLM verifier);
2. trains the TCPO router (paper defaults) and calibrates κ on the calibration split;
3. evaluates it against small-only, large-only, random escalation, the confidence threshold,
   STEER and the oracle on the test split;
4. exports the router and writes report/ (table.md, table.json, accuracy_cost.png, config.json).
Every stage is resumable: re-running continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from generation import answers, costs, tracegen
from generation.tinylm import backend as tiny
from generation.tinylm import task
from jaxroute import evaluate, export, tcpo, trace, trainer
from jaxroute.trace import atomic_write_text
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", "runs/experiment", "Output folder.")
_N = flags.DEFINE_list("problems", ["400", "150", "250"], "Problems in train, cal, test.")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", 1000, "Router training iterations.")
_BATCH = flags.DEFINE_integer("batch_size", 5, "Episodes per iteration.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for problems, sampling and training.")
_SMALL = flags.DEFINE_string("small", "small", "Built-in model for the small role.")
_LARGE = flags.DEFINE_string("large", "large", "Built-in model for the large role.")


def rule_verifier(items):
    """The task's rule verifier: every equation in the step holds (None: no equation)."""
    return [task.check_step(step) for _, _, step in items]


def main(argv):
    del argv
    common.quiet()
    t0 = time.perf_counter()
    work = Path(_WORKDIR.value)
    sizes = dict(zip(("train", "cal", "test"), map(int, _N.value), strict=True))
    problems, splits = [], {}
    for split, n in sizes.items():
        for p in task.generate(n, _SEED.value, split):
            problems.append(p.problem)
            splits[p.problem.problem_id] = split
    backends = [tiny.load(_SMALL.value), tiny.load(_LARGE.value)]
    print(f"[1/4] trace trees: {len(problems)} problems, models "
          f"{[f'{b.name} ({b.params:,.0f} params)' for b in backends]}")
    with answers.AnswerChecker(workers=2) as checker:
        gen = tracegen.TraceGenerator(backends, checker, rule_verifier,
                                      tracegen.GenConfig(max_steps=8, max_tokens_per_step=64,
                                                         max_tokens_per_solution=160, chunk=50,
                                                         seed=_SEED.value),
                                      [costs.Price(0, 0, 0)] * 2)
        tracegen.run(gen, problems, splits, work / "traces",
                     {"task": "procedural arithmetic (generation.tinylm.task)",
                      "models": [b.name for b in backends], "seed": _SEED.value})
    manifest, recs = trace.load_trace_set(work / "traces")
    trees = trace.pack(manifest, recs, "mflops")
    t1 = time.perf_counter()
    print(f"      {t1 - t0:.0f} s")

    print(f"[2/4] training the router (α = {_ALPHA.value}, {_ITERS.value} iterations)")
    cfg = trainer.TrainConfig(tcpo=tcpo.TCPOConfig(alpha=_ALPHA.value), iterations=_ITERS.value,
                              batch_size=_BATCH.value, seed=_SEED.value)
    res = trainer.train(trees, cfg, work / "train")
    export.export_router(work / "router", res.networks, res.state.policy_params,
                         res.state.normalizer, res.kappa, feature_names=manifest.feature_names,
                         model_names=[m.name for m in manifest.models], alpha=_ALPHA.value,
                         hidden=cfg.hidden, extra={"kappa_online": res.kappa_online,
                                                   "cost_model": "mflops"})
    t2 = time.perf_counter()
    print(f"      κ online {res.kappa_online:.4g}, deployed {res.kappa:.4g}; {t2 - t1:.0f} s")

    print("[3/4] evaluating against baselines on the test split")
    result = evaluate.evaluate_all(trees, evaluate.policy_fn(res.networks, res.state), res.kappa,
                                   _ALPHA.value, 0, 1, _SEED.value)
    print("[4/4] report")
    title = f"Embedded default (tiny LMs, arithmetic task) — test split, α = {_ALPHA.value}"
    config = {"problems": sizes, "alpha": _ALPHA.value, "iterations": _ITERS.value,
              "batch_size": _BATCH.value, "seed": _SEED.value,
              "models": {b.name: b.params for b in backends},
              "seconds": {"traces": round(t1 - t0, 1), "train": round(t2 - t1, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    report.write_report(work / "report", result, "FLOPs ×1e6", title, config)
    print(report.markdown_table(result["rows"], "FLOPs ×1e6", title))
    atomic_write_text(work / "report" / "timing.json", json.dumps(config["seconds"]) + "\n")
    print(f"done in {time.perf_counter() - t0:.0f} s; report in {work / 'report'}")


if __name__ == "__main__":
    app.run(main)
