"""Generate trace trees for a math dataset with a small and a large model.

    # Open models on a GPU (vLLM, raw logits):
    python -m launch.generate --dataset=gsm8k --data_path=../shared/data/gsm8k \\
        --models=vllm:/models/Qwen2.5-Math-1.5B-Instruct,vllm:/models/Qwen2.5-Math-7B-Instruct \\
        --out=traces/gsm8k
    # A Qwen draft served by `vllm serve`, gpt-4.1-mini as target, gpt-4o-mini as step verifier:
    python -m launch.generate --dataset=math500 --data_path=../shared/data/math500 \\
        --models=openai-completions:Qwen2.5-Math-1.5B-Instruct@http://localhost:8000/v1,openai:gpt-4.1-mini \\
        --verifier=openai:gpt-4o-mini --out=traces/math500-api

Resumable (re-run the same command); `--num_shards/--shard_index` split the problems across
machines, `--merge=a,b,...` joins shard folders into --out.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from generation import answers, costs, datasets, tracegen
from generation.verifier import StepVerifier
from jaxroute import trace
from launch import common, presets

_DATASET = flags.DEFINE_enum("dataset", "gsm8k", ["gsm8k", "math500", "omnimath"], "Dataset.")
_DATA = flags.DEFINE_string("data_path", None, "Local JSONL file or folder (else hub name).")
_LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N problems.")
_PRESET = flags.DEFINE_string("preset", None, "A paper setup (launch.presets: qwen_math, "
                               "qwen_gpt) filling --models, --verifier and --params.")
_MODELS = flags.DEFINE_list(
    "models", None, "Backends small → large: vllm:PATH, openai:MODEL[@BASE_URL], "
    "or openai-completions:MODEL@BASE_URL.")
_PARAMS = flags.DEFINE_list("params", [], "N per model for FLOPs (default: from config.json "
                            "for vllm:, 0 for API models).")
_VERIFIER = flags.DEFINE_string("verifier", None, "Step verifier, e.g. openai:gpt-4o-mini.")
_OUT = flags.DEFINE_string("out", None, "Trace-set folder to write (resumable).")
_ROOTS = flags.DEFINE_integer("roots", 1, "Sampled small-model trajectories per problem.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 40, "Guard: steps per trajectory.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4096, "Guard: generated tokens per solution.")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Problems generated (and saved) together.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and split seed.")
_SHARDS = flags.DEFINE_integer("num_shards", 1, "Split problems across this many shards.")
_SHARD = flags.DEFINE_integer("shard_index", 0, "This shard.")
_MERGE = flags.DEFINE_list("merge", [], "Shard folders to merge into --out (then exit).")
_TP = flags.DEFINE_integer("tensor_parallel_size", 1, "vLLM tensor parallelism.")
_GPU_MEM = flags.DEFINE_list("gpu_memory_utilization", ["0.25", "0.6"],
                             "vLLM memory share per model.")
_CACHE = flags.DEFINE_string("cache", None, "SQLite response cache for API calls "
                             "(default OUT/api_cache.sqlite).")
flags.mark_flags_as_required(["out"])


def make_backend(spec: str, i: int, cache: Path):
    params = float(_PARAMS.value[i]) if i < len(_PARAMS.value) else None
    mem = float(_GPU_MEM.value[min(i, len(_GPU_MEM.value) - 1)])
    return common.make_backend(spec, params=params, cache=cache, seed=_SEED.value,
                               tensor_parallel_size=_TP.value, gpu_memory_utilization=mem)


def main(argv):
    del argv
    common.quiet()
    out = Path(_OUT.value)
    if _MERGE.value:
        tracegen.merge([Path(p) for p in _MERGE.value], out)
        print(f"merged {len(_MERGE.value)} shards into {out}")
        return
    if _PRESET.value:
        pre = presets.get(_PRESET.value)
        if pre.dataset == "tiny":
            raise flags.ValidationError("the embedded preset's traces come from "
                                        "`python -m launch.experiment`")
        if not _MODELS.value:
            _MODELS.value = list(pre.models)
        if not _VERIFIER.value and pre.verifier:
            _VERIFIER.value = pre.verifier
        if not _PARAMS.value and pre.params:
            _PARAMS.value = [str(p) for p in pre.params]
        if not flags.FLAGS["gpu_memory_utilization"].present:
            _GPU_MEM.value = [str(m) for m in pre.gpu_memory_utilization]
    if not _MODELS.value or len(_MODELS.value) < 2:
        raise flags.ValidationError("--models needs at least two backends, small → large")
    problems = datasets.load(_DATASET.value, _DATA.value, _LIMIT.value)
    splits = datasets.split(problems, seed=_SEED.value)
    cache = Path(_CACHE.value) if _CACHE.value else out / "api_cache.sqlite"
    backends = [make_backend(s, i, cache) for i, s in enumerate(_MODELS.value)]
    verifier = None
    if _VERIFIER.value:
        vb = make_backend(_VERIFIER.value, len(backends), cache)
        verifier = StepVerifier(vb)
    prices = [getattr(b, "price", costs.Price(0, 0, 0)) for b in backends]
    cfg = tracegen.GenConfig(roots=_ROOTS.value, max_steps=_MAX_STEPS.value,
                             max_tokens_per_solution=_MAX_TOKENS.value, chunk=_CHUNK.value,
                             seed=_SEED.value)
    with answers.AnswerChecker() as checker:
        gen = tracegen.TraceGenerator(backends, checker, verifier, cfg, prices)
        provenance = {"dataset": _DATASET.value, "data_path": _DATA.value,
                      "models": _MODELS.value, "verifier": _VERIFIER.value,
                      "config": json.loads(json.dumps(cfg.__dict__))}
        manifest = gen.manifest(provenance)

        def spend(records):
            packed = trace.pack(manifest, records, "usd_cents")
            flops = trace.pack(manifest, records, "flops")
            return {"$": float(packed.step_cost.sum() + packed.branch_cost.sum()) / 100,
                    "PFLOPs": float(flops.step_cost.sum() + flops.branch_cost.sum()) / 1e3}

        tracegen.run(gen, problems, splits, out, provenance, _SHARDS.value, _SHARD.value, spend)
    print(f"trace set in {out}")


if __name__ == "__main__":
    app.run(main)
