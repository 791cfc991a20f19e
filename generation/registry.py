"""Backends from specs (`make_backend`): the one place that knows every implementation (vLLM,
OpenAI-compatible servers, the tiny models), so it sits above `generation.backends` and
`generation.tinylm`. Each implementation is imported lazily, so only the kind asked for must be
installed (vLLM, the OpenAI SDK, the tiny models' flax)."""

from __future__ import annotations

from collections.abc import Callable

from generation.backends.base import Backend
from jaxroute.errors import InputError


def _vllm(rest: str, **kw) -> Backend:
    from generation.backends.vllm_backend import VLLMBackend

    return VLLMBackend(rest, params=kw["params"], tensor_parallel_size=kw["tensor_parallel_size"],
                       gpu_memory_utilization=kw["gpu_memory_utilization"],
                       max_model_len=kw["max_model_len"], seed=kw["seed"], dtype=kw["dtype"],
                       block_size=kw["block_size"])


def _openai(kind: str) -> Callable[..., Backend]:
    def make(rest: str, **kw) -> Backend:
        from generation.backends.openai_backend import OpenAIBackend

        model, _, base = rest.partition("@")
        if not model:
            raise InputError(f"backend spec {kind}:{rest!r} names no model")
        return OpenAIBackend(model, base_url=base or None, api_key=kw["api_key"],
                             params=kw["params"] or 0.0,
                             mode="chat" if kind == "openai" else "completions",
                             cache_path=kw["cache"], seed=kw["seed"],
                             max_error_rate=kw["max_error_rate"],
                             confidence="max_logit" if kind.endswith("-raw") else "top1_prob",
                             **({"template": kw["template"]} if kw.get("template") else {}))

    return make


def _tinylm(rest: str, **kw) -> Backend:
    from generation.tinylm import backend as tiny

    return tiny.load(rest)


# kind → factory(rest of the spec, **settings)
KINDS: dict[str, Callable[..., Backend]] = {
    "vllm": _vllm,
    "openai": _openai("openai"),
    "openai-completions": _openai("openai-completions"),
    "openai-completions-raw": _openai("openai-completions-raw"),
    "tinylm": _tinylm,
}


def make_backend(spec: str, *, params: float | None = None, cache=None, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int | None = None, api_key: str | None = None,
                 max_error_rate: float = 0.5, dtype: str = "auto",
                 block_size: int | None = None, template: str | None = None) -> Backend:
    """A backend from a spec: `vllm:PATH_OR_HUB_NAME`, `openai:MODEL[@BASE_URL]`,
    `openai-completions:MODEL@BASE_URL`, `openai-completions-raw:MODEL@BASE_URL` (a server
    started with `--logprobs-mode raw_logits`: the confidence is the max raw logit, S_os) or
    `tinylm:small|large` (the embedded default).

    An OpenAI-style backend checks its server, key and model before the first request
    (`FatalBackendError`). `dtype` and `block_size` are the in-process vLLM engine's
    (`vllm_backend.engine_kwargs`); `template` is a completions backend's prompt
    (`openai_backend.completion_template`; default Qwen's)."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise InputError(f"unknown backend spec {spec!r} ({', '.join(k + ':…' for k in KINDS)})")
    return KINDS[kind](rest, params=params, cache=cache, seed=seed,
                       tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, api_key=api_key,
                       max_error_rate=max_error_rate, dtype=dtype, block_size=block_size,
                       template=template)
