"""Flags and helpers shared by the launch scripts (no library logic here)."""

from __future__ import annotations

from pathlib import Path

from absl import flags, logging

from jaxroute import synthetic, trace

_TRACES = flags.DEFINE_string("traces", None, "Trace-set folder (manifest.json + trees.jsonl).")
_SYNTHETIC = flags.DEFINE_integer(
    "synthetic", 0, "If > 0 and --traces is unset: use a SYNTHETIC trace set of this many problems "
    "(jaxroute.synthetic; for demos and tests, not real LLM data).")
_SYNTHETIC_K = flags.DEFINE_integer("synthetic_models", 2, "Models in the synthetic set (2 or 3).")
_SEED_DATA = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic trace set.")
_COST = flags.DEFINE_enum("cost_model", "flops", list(trace.COST_MODELS),
                          "Cost unit: FLOPs in 1e12, or US cents from token counts and prices.")


def load_trees() -> tuple[trace.Manifest, trace.PackedTrees, str]:
    """(manifest, packed trees, description) from --traces or --synthetic."""
    if _TRACES.value:
        manifest, problems = trace.load_trace_set(_TRACES.value)
        source = _TRACES.value
    elif _SYNTHETIC.value > 0:
        if _SYNTHETIC_K.value == 3:
            cfg = synthetic.three_model_config(num_problems=_SYNTHETIC.value, seed=_SEED_DATA.value)
        else:
            cfg = synthetic.SyntheticConfig(num_problems=_SYNTHETIC.value, seed=_SEED_DATA.value)
        manifest, problems = synthetic.generate(cfg)
        source = f"SYNTHETIC ({_SYNTHETIC.value} problems, seed {_SEED_DATA.value})"
    else:
        raise flags.ValidationError("give --traces=FOLDER or --synthetic=N")
    return manifest, trace.pack(manifest, problems, _COST.value), source


def make_backend(spec: str, *, params: float | None = None, cache: Path | None = None,
                 seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5):
    """A generation backend from a spec: `vllm:PATH_OR_HUB_NAME`, `openai:MODEL[@BASE_URL]`,
    `openai-completions:MODEL@BASE_URL` or `tinylm:small|large` (the embedded default)."""
    kind, _, rest = spec.partition(":")
    if kind == "vllm":
        from generation.vllm_backend import VLLMBackend

        return VLLMBackend(rest, params=params, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    if kind in ("openai", "openai-completions"):
        from generation.openai_backend import OpenAIBackend

        model, _, base = rest.partition("@")
        return OpenAIBackend(model, base_url=base or None, params=params or 0.0,
                             mode="chat" if kind == "openai" else "completions",
                             cache_path=cache, seed=seed)
    if kind == "tinylm":
        from generation.tinylm import backend as tiny

        return tiny.load(rest)
    raise flags.ValidationError(f"unknown backend spec {spec!r} (vllm:…, openai:…, "
                                "openai-completions:…, tinylm:small|large)")


def export_result(path: Path, result, manifest: trace.Manifest, config, extra: dict) -> Path:
    """Export a trained router with everything serving needs to check it: feature spec, models
    (names, parameter counts, prices), α, κ (deployed and online), network shape, provenance."""
    import dataclasses

    from jaxroute import export

    return export.export_router(
        path, result.networks, result.state.policy_params, result.state.normalizer, result.kappa,
        feature_names=manifest.feature_names, model_names=[m.name for m in manifest.models],
        alpha=config.tcpo.alpha, hidden=config.hidden,
        extra={"kappa_online": result.kappa_online,
               "calibration_feasible": result.calibration_feasible,
               "models": [dataclasses.asdict(m) for m in manifest.models],
               "trace_provenance": manifest.provenance, "synthetic": manifest.synthetic,
               "train_config": dataclasses.asdict(config), **extra})


def cost_model() -> str:
    return _COST.value


def quiet() -> None:
    """Keep orbax's per-save INFO lines out of the progress output."""
    logging.set_verbosity(logging.WARNING)
