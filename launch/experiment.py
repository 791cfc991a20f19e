"""The main job on the embedded default: tiny LMs → trace trees → router → evaluation → export.

    python -m launch.experiment            # defaults: runs/experiment, minutes on 2 CPU cores

1. generates trace trees for the procedural arithmetic task with the two built-in tiny LMs
   (stepwise, real logits; the rule-based step verifier stands in for the LLM verifier);
2. trains the TCPO router and calibrates κ on the calibration split, and exports it;
3. evaluates it against small-only, large-only, random escalation, the confidence threshold,
   STEER and the oracle on the test split (replayed on the trace trees);
4. runs the exported router live, next to the per-step baselines that cannot be replayed — RSD
   (the stand-in tiny PRM) and SpecReason (the stand-in tiny judge) on the 0.1 grid
   (`generation.comparison.compare_live`);
5. writes report/ (table.md, table.json, accuracy_cost.png, config.json, timing.json).
Every stage is resumable: re-running continues where it stopped.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from absl import app, flags

from generation import answers, comparison, online
from generation.tinylm import backend as tiny
from generation.tinylm import embedded
from jaxroute import evaluate, export, records, tcpo, trace, trainer
from jaxroute.durable import atomic_write_text
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", "runs/experiment", "Output folder.")
_N = flags.DEFINE_list("problems", ["400", "150", "250"], "Problems in train, cal, test.")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", trainer.TrainConfig.iterations,
                              "Router training iterations.")
# Batch 64, not the paper's 5: decision 61.
_BATCH = flags.DEFINE_integer("batch_size", 64, "Episodes per iteration.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for problems, sampling and training.")
_SMALL = flags.DEFINE_string("small", "small", "Built-in model for the small role.")
_LARGE = flags.DEFINE_string("large", "large", "Built-in model for the large role.")
_ONLINE = flags.DEFINE_bool("online", True, "Run the online stage (router live, RSD, SpecReason).")

UNIT = "FLOPs ×1e6"


def main(argv):
    del argv
    common.quiet()
    clock = {"start": time.perf_counter()}
    work, seed, alpha = Path(_WORKDIR.value), _SEED.value, _ALPHA.value
    sizes = dict(zip(embedded.SPLIT_NAMES, map(int, _N.value), strict=True))
    problems, splits = embedded.problems_and_splits(sizes, seed)
    backends = [tiny.load(_SMALL.value), tiny.load(_LARGE.value)]
    print(f"[1/5] trace trees: {len(problems)} problems, models "
          f"{[f'{b.name} ({b.params:,.0f} params)' for b in backends]}")
    with answers.AnswerChecker(workers=2) as checker:
        embedded.make_trace_set(backends, problems, splits, work / "traces", seed, checker)
    manifest, recs = trace.load_trace_set(work / "traces")
    trees = trace.pack(manifest, recs, "mflops")
    clock["traces"] = time.perf_counter()
    print(f"[2/5] training the router (α = {alpha}, {_ITERS.value} iterations)")
    cfg = trainer.TrainConfig(tcpo=tcpo.TCPOConfig(alpha=alpha), iterations=_ITERS.value,
                              batch_size=_BATCH.value, seed=seed)
    res = trainer.train_and_export(trees, manifest, cfg, work / "train", source=str(work / "traces"),
                                   cost_model="mflops", router_dir=work / "router")
    clock["train"] = time.perf_counter()
    print(f"      κ online {res.kappa_online:.4g}, deployed {res.kappa:.4g}; "
          f"{clock['train'] - clock['traces']:.0f} s")
    print("[3/5] evaluating against baselines on the test split")
    names = list(manifest.feature_names)
    result = evaluate.evaluate_all(trees, evaluate.policy_fn(res.networks, res.state), res.kappa,
                                   alpha, names.index("confidence"), names.index("step_index"),
                                   seed)
    clock["evaluate"] = time.perf_counter()
    if _ONLINE.value:
        print("[4/5] online: the exported router, RSD and SpecReason, live on the test split")
        router = export.load_router(work / "router", feature_names=manifest.feature_names,
                                    model_names=[m.name for m in manifest.models])
        with answers.AnswerChecker(workers=2) as checker:
            live = comparison.compare_live(
                embedded.live_methods(router, backends),
                *(([p for p in problems if splits[p.problem_id] == s]) for s in ("cal", "test")),
                backends, checker, online.OnlineConfig(seed=seed, **embedded.GEN_CONFIG),
                manifest.models, "mflops", seed=seed,
                large_right={r["problem_id"]: bool(r["solo"][-1]["correct"]) for r in recs})
        for name, rs in live.records.items():
            records.write_paths(work / "online" / re.sub(r"[^a-z0-9]+", "_", name.lower()),
                                manifest, rs)
        result["rows"] += live.rows
        result["curves"].update(live.curves)
        result["matched"] = evaluate.matched_costs(result["rows"], result["curves"])
    clock["online"] = time.perf_counter()
    print(f"      {clock['online'] - clock['evaluate']:.0f} s")
    print("[5/5] report")
    seconds = {k: round(clock[k] - clock[p], 1) for p, k in
               (("start", "traces"), ("traces", "train"), ("evaluate", "online"))}
    seconds["total"] = round(time.perf_counter() - clock["start"], 1)
    title = f"Embedded default (tiny LMs, arithmetic task) — test split, α = {alpha}"
    config = {"problems": sizes, "alpha": alpha, "iterations": _ITERS.value,
              "batch_size": _BATCH.value, "seed": seed,
              "models": {b.name: b.params for b in backends}, "seconds": seconds}
    report.write_report(work / "report", result, UNIT, title, config)
    print(report.markdown_table(result["rows"], UNIT, title) + report.matched_line(result, UNIT))
    atomic_write_text(work / "report" / "timing.json", json.dumps(seconds) + "\n")
    print(f"done in {seconds['total']:.0f} s; report in {work / 'report'}")


if __name__ == "__main__":
    app.run(main)
