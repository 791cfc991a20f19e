"""The routing benchmark: every method at the same guarantee across routing worlds and seeds.

    python -m launch.benchmark_routing            # the full suite (≤ 30 min on 2 cores)
    python -m launch.benchmark_routing --quick    # two worlds, one data seed (≤ 5 min)
    python -m launch.benchmark_routing --validity # both guarantees checked by re-splitting

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

import numpy as np
from absl import flags

from generation import main_job
from generation.tinylm import backend as tiny
from generation.traces import answers
from jaxroute import exact, suite, trace, traceset
from jaxroute.durable import append_records, atomic_write_text, strict_json
from jaxroute.errors import InputError
from launch import common, report
from launch.results import save

_QUICK = flags.DEFINE_bool("quick", False, "Two worlds, one data seed (the ≤ 5-minute subset).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default runs/benchmark_routing[_quick]).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.02", "0.05", "0.1"], "Target miscoverages.")
_SEEDS = flags.DEFINE_integer("train_seeds", 3, "Training seeds per router.")
_DATA = flags.DEFINE_integer("data_seeds", 2, "Data seeds per world (--quick: 1).")
_WORLDS = flags.DEFINE_list("worlds", None, "Subset of world names without their commas, e.g. "
                            "'cov 0.75 AUROC 0.75,embedded tiny LMs' (default: all / quick set).")


def _chosen(default: list[str]) -> list[str]:
    """World names from --worlds (a list flag splits at commas, so names are given without
    theirs); an unknown name is an error naming the known ones."""
    if not _WORLDS.value:
        return list(default)
    plain = {w.name.replace(",", ""): w.name for w in suite.WORLDS}
    unknown = [n for n in _WORLDS.value if n.strip() not in plain]
    if unknown:
        raise InputError(f"--worlds: unknown {unknown}; known: {sorted(plain)}")
    return [plain[n.strip()] for n in _WORLDS.value]
_PAPER = flags.DEFINE_bool("paper", True, "Also train the paper-faithful TCPO rows.")
_ABLATION = flags.DEFINE_bool("ablation", False, "Measure the trainer ideas of "
                              "jaxroute.suite.ABLATIONS on the quick worlds (no paper rows).")
_VALIDITY = flags.DEFINE_bool("validity", False, "Check both guarantees as stated: random "
                              "calibration/test re-splits of a large pool, no retraining "
                              "(jaxroute.validity).")
_RESPLITS = flags.DEFINE_integer("resplits", 200, "--validity: re-splits per (world, α).")
_CAL = flags.DEFINE_integer("calibration", 200, "--validity: calibration problems per re-split.")
_DELTA = flags.DEFINE_float("delta", 0.1, "--validity: δ of the PAC guarantee.")
_POOL = flags.DEFINE_list("pool", ["400", "1800", "1800"], "--validity: (train, cal, test) "
                          "problems per world; cal and test together are the re-split pool.")


def embedded_trees(out: Path, data_seed: int, sizes: tuple[int, int, int] = (400, 150, 250),
                   reference: bool = False
                   ) -> tuple[trace.Manifest, trace.PackedTrees, np.ndarray | None]:
    """The embedded tiny-LM trees of one data seed (generated once, then read back), and with
    `reference` the nodes' coverage gains from fresh rollouts for the perfect-risk reference
    (`main_job.risk_gain`: data seed 0 at the default sizes is the main job's committed set;
    any other set computes them once, a few minutes, and caches them beside its traces)."""
    folder = out / f"embedded_traces_seed{data_seed}"
    problems, splits = main_job.problems_and_splits(
        dict(zip(main_job.SPLIT_NAMES, sizes, strict=True)), data_seed)
    backends = [tiny.load("small"), tiny.load("large")]
    with answers.AnswerChecker(workers=2) as checker:
        main_job.make_trace_set(backends, problems, splits, folder, data_seed, checker)
    manifest, recs = traceset.load_trace_set(folder)
    trees = trace.pack(manifest, recs, "mflops")
    gain = main_job.risk_gain(backends, trees, recs, problems, data_seed,
                              cache=folder / "perfect_risk.npz") if reference else None
    return manifest, trees, gain


def validity_main() -> None:
    """`--validity`: every world, each α, both guarantees (see `jaxroute.validity`)."""
    t0 = time.perf_counter()
    out = Path(_OUT.value or "runs/benchmark_validity")
    out.mkdir(parents=True, exist_ok=True)
    sizes = tuple(int(x) for x in _POOL.value)
    names = _chosen([w.name for w in suite.WORLDS])
    alphas = [float(a) for a in _ALPHAS.value]
    rec_file = out / "records.jsonl"
    done = {json.loads(x)["world"] for x in rec_file.read_text().splitlines()} \
        if rec_file.exists() else set()
    for w in suite.WORLDS:
        if w.name not in names or w.name in done:
            continue
        manifest, trees = (suite.synthetic_world(w, 0, sizes) if w.synthetic
                           else embedded_trees(out, 0, sizes)[:2])
        append_records(rec_file, suite.validity_world(
            w.name, manifest, trees, alphas, _DELTA.value, _CAL.value, _RESPLITS.value))
    records = [json.loads(x) for x in rec_file.read_text().splitlines()]
    records = [r for r in records if r["world"] in names]
    cols, rows = report.validity_columns(records)
    minutes = (time.perf_counter() - t0) / 60
    notes = report.validity_notes(records, _DELTA.value, _CAL.value, _RESPLITS.value, sizes,
                                  minutes)
    md = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                   + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"
    atomic_write_text(out / "table.md", md + "\n" + notes + "\n")
    print(md + "\n" + notes)
    save("routing_validity", f"Guarantee validity: {_RESPLITS.value} calibration/test re-splits "
         f"per (world, α), n = {_CAL.value} calibration problems, no retraining", cols, rows,
         notes=notes)


def main(argv):
    del argv
    if _VALIDITY.value:
        validity_main()
        return
    t0 = time.perf_counter()
    quick, ablation = _QUICK.value or _ABLATION.value, _ABLATION.value
    name = "routing_ablation" if ablation else "routing_quick" if quick else "routing"
    out = Path(_OUT.value or f"runs/benchmark_{name}")
    out.mkdir(parents=True, exist_ok=True)
    names = _chosen(suite.QUICK_WORLDS if quick else [w.name for w in suite.WORLDS])
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
    embedded_sets = {d: embedded_trees(out, d, reference=not ablation) for d in data_seeds
                     if any(not w.synthetic and (w.name, d) not in done for w in worlds)}
    for w in worlds:
        for d in data_seeds:
            if (w.name, d) in done:
                continue
            manifest, trees, gain = ((*suite.synthetic_world(w, d), None) if w.synthetic
                                     else embedded_sets[d])
            recs = suite.run_world(w.name, d, manifest, trees, alphas, train_seeds,
                                   exact.ExactConfig(), paper=_PAPER.value and not ablation,
                                   variants=suite.ABLATIONS if ablation else None, gain=gain)
            append_records(rec_file, recs)  # a world's records land together: resumable
    records = [json.loads(x) for x in rec_file.read_text().splitlines()]
    records = [r for r in records if r["world"] in names]
    rows = suite.aggregate(records)
    verdicts = suite.targets(rows)
    atomic_write_text(out / "summary.json", strict_json({"rows": rows, "targets": verdicts},
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
             notes=f"`--ablation` on the quick worlds; wall time {minutes:.1f} min.",
             extra={"guarantee": "marginal"})
        return
    save(name, "Routing benchmark" + (" (--quick)" if quick else "") + ": cost / large-only at "
         "the guarantee, mean ± sd over seeds", *report.routing_columns(rows),
         notes=report.routing_notes(verdicts, minutes, len(train_seeds), len(data_seeds)),
         extra={"guarantee": "marginal"})


if __name__ == "__main__":
    common.run(main)
