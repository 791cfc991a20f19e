"""The routing benchmark: every method at the same guarantee across routing worlds and seeds.

    python -m launch.benchmark_routing            # the full suite (≤ 30 min on 2 cores)
    python -m launch.benchmark_routing --quick    # two worlds, one data seed (≤ 5 min)

Worlds: synthetic families varying the small model's coverage and the confidence feature's
wrong-step AUROC (K = 2 and K = 3) and the embedded tiny-LM trees (`jaxroute.suite`). Output in
--out: records.jsonl (one line per world, data seed, α, method and training seed; resumable),
table.md, summary.json, one cost-vs-coverage plot per world, and runs/benchmarks/routing.json
(or routing_quick.json) for `python -m launch.results`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from absl import flags

from generation import answers
from generation.tinylm import backend as tiny
from generation.tinylm import embedded
from jaxroute import exact, suite, trace
from jaxroute.durable import append_records, atomic_write_text
from launch import common, report
from launch.results import save

_QUICK = flags.DEFINE_bool("quick", False, "Two worlds, one data seed (the ≤ 5-minute subset).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default runs/benchmark_routing[_quick]).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.02", "0.05", "0.1"], "Target miscoverages.")
_SEEDS = flags.DEFINE_integer("train_seeds", 3, "Training seeds per router.")
_DATA = flags.DEFINE_integer("data_seeds", 2, "Data seeds per world (--quick: 1).")
_WORLDS = flags.DEFINE_list("worlds", None, "Subset of world names (default: all / quick set).")
_PAPER = flags.DEFINE_bool("paper", True, "Also train the paper-faithful TCPO rows.")
_ABLATION = flags.DEFINE_bool("ablation", False, "Measure the trainer ideas of "
                              "jaxroute.suite.ABLATIONS on the quick worlds (no paper rows).")


def embedded_trees(out: Path, data_seed: int) -> tuple[trace.Manifest, trace.PackedTrees]:
    """The embedded tiny-LM trees of one data seed (generated once, then read back)."""
    folder = out / f"embedded_traces_seed{data_seed}"
    problems, splits = embedded.problems_and_splits({"train": 400, "cal": 150, "test": 250},
                                                    data_seed)
    backends = [tiny.load("small"), tiny.load("large")]
    with answers.AnswerChecker(workers=2) as checker:
        embedded.make_trace_set(backends, problems, splits, folder, data_seed, checker)
    manifest, recs = trace.load_trace_set(folder)
    return manifest, trace.pack(manifest, recs, "mflops")


def main(argv):
    del argv
    t0 = time.perf_counter()
    quick, ablation = _QUICK.value or _ABLATION.value, _ABLATION.value
    name = "routing_ablation" if ablation else "routing_quick" if quick else "routing"
    out = Path(_OUT.value or f"runs/benchmark_{name}")
    out.mkdir(parents=True, exist_ok=True)
    names = _WORLDS.value or (suite.QUICK_WORLDS if quick else [w.name for w in suite.WORLDS])
    worlds = [w for w in suite.WORLDS if w.name in names]
    data_seeds = range(1 if quick else _DATA.value)
    alphas = [float(a) for a in _ALPHAS.value]
    train_seeds = tuple(range(_SEEDS.value))
    rec_file = out / "records.jsonl"
    done = set()
    if rec_file.exists():
        for line in rec_file.read_text().splitlines():
            r = json.loads(line)
            done.add((r["world"], r["data_seed"]))
    # The embedded trees first: trace generation is the only stage that runs language models.
    embedded_sets = {d: embedded_trees(out, d) for d in data_seeds
                     if any(not w.synthetic and (w.name, d) not in done for w in worlds)}
    for w in worlds:
        for d in data_seeds:
            if (w.name, d) in done:
                continue
            manifest, trees = suite.synthetic_world(w, d) if w.synthetic else embedded_sets[d]
            recs = suite.run_world(w.name, d, manifest, trees, alphas, train_seeds,
                                   exact.ExactConfig(), paper=_PAPER.value and not ablation,
                                   variants=suite.ABLATIONS if ablation else None)
            append_records(rec_file, recs)  # a world's records land together: resumable
    records = [json.loads(x) for x in rec_file.read_text().splitlines()]
    records = [r for r in records if r["world"] in names]
    rows = suite.aggregate(records)
    verdicts = suite.targets(rows)
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, "targets": verdicts},
                                                       indent=2, default=float) + "\n")
    md = report.routing_table(rows, verdicts)
    if ablation:
        cols, body = report.ablation_columns(rows)
        md = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                       + ["| " + " | ".join(str(c) for c in r) + " |" for r in body]) + "\n"
    atomic_write_text(out / "table.md", md)
    for w in names:
        report.routing_plot(out / f"{re.sub(r'[^a-z0-9]+', '_', w.lower()).strip('_')}.png",
                            [r for r in rows if r["world"] == w], w)
    print(md)
    minutes = (time.perf_counter() - t0) / 60
    print(f"done in {minutes:.1f} min; {out}")
    if ablation:
        save(name, "Trainer ideas (decision 70): cost / large-only at the guarantee, mean ± sd "
             "over training seeds", *report.ablation_columns(rows),
             notes=f"`--ablation` on the quick worlds; wall time {minutes:.1f} min.")
        return
    save(name, "Routing benchmark" + (" (--quick)" if quick else "") + ": cost / large-only at "
         "the guarantee, mean ± sd over seeds", *report.routing_columns(rows),
         notes=report.routing_notes(verdicts, minutes, len(train_seeds), len(data_seeds)))


if __name__ == "__main__":
    common.run(main)
