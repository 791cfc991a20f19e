"""Generate trace trees for a math dataset with a small and a large model.

    # Open models on a GPU (vLLM, raw logits):
    python -m launch.generate --dataset=gsm8k --data_path=../shared/data/gsm8k \\
        --models=vllm:/models/Qwen2.5-Math-1.5B-Instruct,vllm:/models/Qwen2.5-Math-7B-Instruct \\
        --out=traces/gsm8k
    # A Qwen draft served by `vllm serve`, gpt-4.1-mini as target, gpt-4o-mini as step verifier:
    python -m launch.generate --dataset=math500 --data_path=../shared/data/math500 \\
        --models=openai-completions:Qwen2.5-Math-1.5B-Instruct@http://localhost:8000/v1,openai:gpt-4.1-mini \\
        --verifier=openai:gpt-4o-mini --out=traces/math500-api

    # Fanned out over a Ray cluster (`ray start --head` here, `ray start --address=…` on each
    # GPU node), one shard per task, merged into --out:
    python -m launch.generate --preset=qwen_math --data_path=../shared/data/gsm8k \
        --ray=auto --num_shards=16 --gpus_per_shard=1 --out=traces/gsm8k

Resumable (re-run the same command); `--num_shards/--shard_index` split the problems across
machines by hand, `--merge=a,b,...` joins shard folders into --out; `--ray` runs every shard as
a Ray task (`generation.fanout`, decision 93).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import flags

from generation import fanout, main_job
from generation.backends.base import redact_spec
from generation.traces import datasets, tracegen
from launch import common, presets

_DATASET = flags.DEFINE_enum("dataset", "gsm8k", ["gsm8k", "math500", "omnimath", "tiny"],
                             "Dataset (tiny: the embedded procedural task, for the exported tiny "
                             "models in a real engine; --limit problems, split 50/20/30).")
_DATA = flags.DEFINE_string("data_path", None, "Local JSONL file or folder (else hub name).")
_LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N problems.")
_PRESET = flags.DEFINE_string("preset", None, "A paper setup (launch.presets: qwen_math, "
                               "qwen_gpt) filling --models, --verifier and --params.")
_MODELS = flags.DEFINE_list(
    "models", None, "Backends small → large: vllm:PATH, openai:MODEL[@BASE_URL], "
    "or openai-completions:MODEL@BASE_URL.")
_PARAMS = flags.DEFINE_list("params", [], "N per model for FLOPs (default: from config.json "
                            "for vllm:, 0 for API models).")
_VERIFIER = flags.DEFINE_string("verifier", None, "Step verifier, e.g. openai:gpt-4o-mini, or "
                                "rule (the procedural task's rule verifier).")
_OUT = flags.DEFINE_string("out", None, "Trace-set folder to write (resumable).")
_G = tracegen.GenConfig  # flag defaults are the config's defaults
_ROOTS = flags.DEFINE_integer("roots", _G.roots, "Sampled small-model trajectories per problem.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", _G.max_steps, "Guard: steps per trajectory.")
_STEP_TOKENS = flags.DEFINE_integer("max_tokens_per_step", None, "Tokens per step request "
                                    f"(default {_G.max_tokens_per_step}; an OpenAI-style server "
                                    "clamps it to its context).")
_DTYPE = flags.DEFINE_string("dtype", None, "vLLM engines' dtype (default auto; float32 on a "
                             "CPU).")
_BLOCK = flags.DEFINE_integer("block_size", None, "vLLM KV-cache block size (default: the "
                              "engine's; 32 on a CPU).")
_MAX_LEN = flags.DEFINE_integer("max_model_len", None, "vLLM engines' context (default: the "
                                "preset's, else the model's).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", _G.max_tokens_per_solution,
                                   "Guard: generated tokens per solution.")
_CHUNK = flags.DEFINE_integer("chunk", _G.chunk, "Problems generated (and saved) together.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and split seed.")
_SHARDS = flags.DEFINE_integer("num_shards", 1, "Split problems across this many shards.")
_SHARD = flags.DEFINE_integer("shard_index", 0, "This shard.")
_MERGE = flags.DEFINE_list("merge", [], "Shard folders to merge into --out (then exit).")
_RAY = flags.DEFINE_string("ray", None, "Run the --num_shards shards as Ray tasks: 'local' (a "
                           "private cluster on this machine), 'auto' (the running cluster) or "
                           "a cluster address (pip install 'jaxroute[ray]').")
_SHARD_GPUS = flags.DEFINE_float("gpus_per_shard", None, "--ray: GPUs per shard task (default: "
                                 "--tensor_parallel_size with vllm: models on a cluster with "
                                 "GPUs, else 0).")
_SHARD_CPUS = flags.DEFINE_float("cpus_per_shard", 1.0, "--ray: CPUs per shard task.")
_RETRIES = flags.DEFINE_integer("max_retries", 3, "--ray: times a shard whose worker died is "
                                "started again (it resumes its folder).")
_TP = flags.DEFINE_integer("tensor_parallel_size", 1, "vLLM tensor parallelism.")
_GPU_MEM = flags.DEFINE_list("gpu_memory_utilization", ["0.25", "0.6"],
                             "vLLM memory share per model.")
_CACHE = flags.DEFINE_string("cache", None, "SQLite response cache for API calls "
                             "(default OUT/api_cache.sqlite).")
_API_KEY = flags.DEFINE_string("api_key", None, "Key for OpenAI-style backends (default: the "
                               "OPENAI_API_KEY environment variable).")
_PARTIAL = flags.DEFINE_bool("accept_partial", False, "Write problems with failed requests too, "
                             "marked unusable (default: leave them for a re-run and exit 1).")
_ERROR_RATE = flags.DEFINE_float("max_error_rate", 0.5, "Stop once more than this share of "
                                 "requests to one server has failed.")
flags.mark_flags_as_required(["out"])
common.check_flags(roots=(common.positive, "≥ 1"), max_steps=(common.positive, "≥ 1"),
                   max_tokens=(common.positive, "≥ 1"), chunk=(common.positive, "≥ 1"),
                   max_tokens_per_step=(common.positive, "≥ 1"),
                   block_size=(lambda v: v >= 1 and v % 16 == 0, "a multiple of 16"),
                   max_model_len=(common.positive, "≥ 1"),
                   num_shards=(common.positive, "≥ 1"), limit=(common.positive, "≥ 1"),
                   gpus_per_shard=(lambda v: v >= 0, "≥ 0"),
                   cpus_per_shard=(lambda v: v >= 0, "≥ 0"),
                   max_retries=(lambda v: v >= 0, "≥ 0"),
                   tensor_parallel_size=(common.positive, "≥ 1"),
                   max_error_rate=(lambda v: 0 < v <= 1, "in (0, 1]"),
                   gpu_memory_utilization=(lambda v: all(0 < float(x) <= 1 for x in v),
                                           "shares in (0, 1]"))


def settings() -> presets.Preset:
    """The preset (if any) with the flags the user gave on top; flags are never mutated."""
    base = presets.get(_PRESET.value) if _PRESET.value else presets.Preset(models=())
    if base.models and base.models[0].startswith("tinylm:"):
        raise flags.ValidationError("the embedded preset's traces come from "
                                    "`python -m launch.experiment`")
    mem = _GPU_MEM.value if flags.FLAGS["gpu_memory_utilization"].present or not _PRESET.value \
        else None
    dataset = _DATASET.value if flags.FLAGS["dataset"].present or not _PRESET.value else None
    return base.merged(models=_MODELS.value, verifier=_VERIFIER.value, params=_PARAMS.value or None,
                       gpu_memory_utilization=mem, dtype=_DTYPE.value, block_size=_BLOCK.value,
                       max_model_len=_MAX_LEN.value, max_tokens_per_step=_STEP_TOKENS.value,
                       dataset=dataset)


def main(argv):
    del argv
    out = Path(_OUT.value)
    if _MERGE.value:
        tracegen.merge([Path(p) for p in _MERGE.value], out)
        print(f"merged {len(_MERGE.value)} shards into {out}")
        return
    if _RAY.value and flags.FLAGS["shard_index"].present:
        raise flags.ValidationError("--ray runs every one of the --num_shards shards; drop "
                                    "--shard_index")
    cfg = settings()
    if len(cfg.models) < 2:
        raise flags.ValidationError("--models needs at least two backends, small → large")
    if cfg.dataset == "tiny":
        n = _LIMIT.value or 300
        problems, splits = main_job.problems_and_splits(
            {"train": n // 2, "cal": n // 5, "test": n - n // 2 - n // 5}, _SEED.value)
    else:
        problems = datasets.load(cfg.dataset, _DATA.value, _LIMIT.value)
        splits = datasets.split(problems, seed=_SEED.value)
    spec = fanout.GeneratorSpec(
        models=tuple(cfg.models), verifier=cfg.verifier,
        gen=tracegen.GenConfig(roots=_ROOTS.value, max_steps=_MAX_STEPS.value,
                               max_tokens_per_step=cfg.max_tokens_per_step,
                               max_tokens_per_solution=_MAX_TOKENS.value, chunk=_CHUNK.value,
                               seed=_SEED.value),
        params=tuple(cfg.param(i) for i in range(len(cfg.models) + 1)),
        memory=tuple(cfg.memory(i) for i in range(len(cfg.models) + 1)),
        options=(("seed", _SEED.value), ("tensor_parallel_size", _TP.value),
                 ("max_model_len", cfg.max_model_len), ("max_error_rate", _ERROR_RATE.value),
                 ("dtype", cfg.dtype), ("block_size", cfg.block_size)),
        api_key=_API_KEY.value)
    provenance = {"dataset": cfg.dataset, "data_path": _DATA.value,
                  "models": [redact_spec(m) for m in cfg.models],
                  "verifier": redact_spec(cfg.verifier) or None,
                  "config": dataclasses.asdict(spec.gen)}
    if _RAY.value:
        summary = fanout.generate_on_ray(
            spec, problems, splits, out, provenance, _SHARDS.value, _RAY.value,
            {"num_cpus": _SHARD_CPUS.value, "num_gpus": _SHARD_GPUS.value}, _RETRIES.value,
            _PARTIAL.value)
    else:
        summary = fanout.generate(spec, problems, splits, out, provenance, _SHARDS.value,
                                  _SHARD.value, _PARTIAL.value,
                                  Path(_CACHE.value) if _CACHE.value else out / "api_cache.sqlite")
    print(summary.line())
    for b in summary.backends:
        print(f"  {b['model']}: {b['requests']} requests, {b['cache_hits']} from cache, "
              f"{b['retries']} retries, {b['failures']} failed {b['failure_reasons'] or ''}")
    if summary.failed and not _PARTIAL.value:
        raise SystemExit(f"{len(summary.failed)} problems failed and were not written; re-run "
                         "the same command to retry them, or pass --accept_partial")


if __name__ == "__main__":
    common.run(main)
