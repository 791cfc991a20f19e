"""Trace generation fanned out over Ray against one process, and what paper-scale sets cost.

    python -m launch.benchmark_fanout                  # the main job's 800 problems, 2 shards

Generates the main job's trace set (the tiny engine) twice from scratch in one run: in this
process, and as --shards Ray tasks on a private local cluster (its start-up counted); prints
the wall-time ratio and how equal the two sets are (`traceset.compare_records`). Then estimates
the generation cost of paper-scale tree sets (`fanout.paper_scale_estimate`) with the large
model's tokens per tree checked against the formula on the measured trees. Writes
runs/benchmarks/fanout.json and fanout_estimate.json for `python -m launch.results`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from absl import flags

from generation import fanout, main_job
from generation.traces import datasets, tracegen
from jaxroute import traceset
from launch import common
from launch.results import save

_SIZES = flags.DEFINE_list("sizes", ["400", "150", "250"], "Train, cal and test problems.")
_SHARDS = flags.DEFINE_integer("shards", 2, "Ray tasks (one per shard).")
_OUT = flags.DEFINE_string("out", "runs/benchmark_fanout", "Output folder (rewritten).")
_DATA = flags.DEFINE_string("data", "../shared/data", "Folder of the datasets (problem counts).")
common.check_flags(shards=(common.positive, "≥ 1"))

DATASETS = ("gsm8k", "math500", "omnimath")  # each in DATA/<name>
STEPS = (4, 8, 16)


def _fresh(path: Path) -> Path:
    """An empty folder: both runs generate everything."""
    if path.exists():
        shutil.rmtree(path)
    return path


def main(argv):
    del argv
    out = Path(_OUT.value)
    sizes = dict(zip(main_job.SPLIT_NAMES, (int(x) for x in _SIZES.value), strict=True))
    problems, splits = main_job.problems_and_splits(sizes, 0)
    spec = fanout.GeneratorSpec(("tinylm:small", "tinylm:large"), verifier="rule",
                                gen=tracegen.GenConfig(chunk=50, seed=0, **main_job.GEN_CONFIG))
    prov = {"benchmark": "fanout"}
    t0 = time.perf_counter()
    fanout.generate(spec, problems, splits, _fresh(out / "single"), prov)
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    fanout.generate_on_ray(spec, problems, splits, _fresh(out / "ray"), prov, _SHARDS.value)
    ray = time.perf_counter() - t0
    _, ref = traceset.load_trace_set(out / "single")
    _, got = traceset.load_trace_set(out / "ray")
    same, identical, gap = traceset.compare_records(got, ref)
    print(f"one process {single:.1f} s; {_SHARDS.value} Ray shards {ray:.1f} s "
          f"({ray / single:.2f}×); {same}/{len(ref)} records equal ({identical} bit-identical, "
          f"largest float gap {gap:.1e})")
    save("fanout", f"Trace generation: one process against {_SHARDS.value} Ray shards, same "
         "set, one run", ["problems", "one process (s)", "Ray (s, cluster start-up included)",
                          "Ray / one process", "records equal", "bit-identical",
                          "largest float gap"],
         [[len(ref), round(single, 1), round(ray, 1), round(ray / single, 3),
           f"{same}/{len(ref)}", identical, f"{gap:.1e}"]],
         notes="The main job's trace set (tiny engine, 2-core CPU); equal = texts, token ids, "
               "labels and costs identical, floats within 1e-4 (float32 batches of other "
               "shapes; one process with another --chunk differs as much).",
         extra={"ray_over_single": ray / single})
    tokens = fanout.tree_tokens(ref)
    ratio = tokens["large"] / tokens["formula_large"]
    rows = []
    for name in DATASETS:
        n = len(datasets.load(name, Path(_DATA.value) / name))
        for s in STEPS:
            e = fanout.paper_scale_estimate(n, s, name, measured_ratio=ratio)
            rows.append([name, n, s, round(e["small_tokens"] / 1e6, 2),
                         round(e["large_tokens"] / 1e6, 2),
                         *(round(e[f"gpu_hours {g}"], 2) for g in fanout.DECODE_TOKENS_PER_S)])
    save("fanout_estimate", "Generating paper-scale tree sets (Qwen2.5-Math 1.5B → 7B, one root)",
         ["dataset", "problems", "steps per solution", "small tokens (M)", "large tokens (M)",
          *(f"GPU-hours ({g})" for g in fanout.DECODE_TOKENS_PER_S)], rows,
         notes=(f"Tokens per solution from the paper's Table 1 FLOPs (2N per token); the large "
                f"model's tokens per tree = L·(S + 1)/2 × {ratio:.2f}, the ratio of measured to "
                f"formula on the main job's trees ({tokens['large']:.0f} vs "
                f"{tokens['formula_large']:.0f} tokens per problem, {tokens['steps']:.1f} steps); "
                "decode rates of one GPU from third-party vLLM figures "
                "(`generation.fanout.DECODE_TOKENS_PER_S`); prefill left out. Shards divide "
                "the wall time by the GPUs given."))


if __name__ == "__main__":
    common.run(main)
