"""The one backend interface: "given these problems and their current step prefixes, generate
the next step (or the rest of the solution) with this model"."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

STEP_DELIMITER = "\n\n"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """One problem waiting for its next step.

    `steps` are the accepted steps so far (texts, without delimiters); `token_ids` is the same
    prefix as generated token ids when the backend can continue by ids (no re-tokenisation drift).
    """

    key: str  # stable id of this request (problem, path, step) — seeds and caches derive from it
    question: str
    steps: tuple[str, ...] = ()
    token_ids: tuple[int, ...] | None = None
    seed: int = 0


@dataclasses.dataclass
class StepResult:
    text: str  # the generated step (or rest of the solution), delimiter stripped
    token_ids: list[int]
    tokens: list[str]  # decoded token strings, aligned with `confidence`
    confidence: list[float]  # per token: max raw logit (kind "max_logit") or top-1 prob
    confidence_kind: str  # "max_logit" | "top1_prob"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (delimiter or EOS) | "length"
    is_final: bool  # EOS, a \boxed{} answer, or the length limit
    error: str | None = None  # a per-request failure (kept, not raised)


class Backend(Protocol):
    name: str
    params: float  # N for FLOPs (0 if unknown, e.g. a closed API model)

    def generate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                 max_tokens: int = 1024) -> list[StepResult]:
        """Next step for every request (`whole=True`: the rest of the solution, no step stop)."""
        ...


def is_final_step(text: str, finish_reason: str, eos: bool) -> bool:
    """EOS, an answer in \\boxed{}, or truncation by the length limit all end the solution."""
    return eos or "\\boxed" in text or finish_reason == "length"


def prefix_text(steps: Sequence[str]) -> str:
    """The assistant text so far, steps joined by the delimiter, with a trailing delimiter."""
    return "".join(s + STEP_DELIMITER for s in steps)


def redact_url(url: str | None) -> str | None:
    """A URL without credentials (user:password@host) — safe for provenance and logs."""
    if url is None:
        return None
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts)


def redact_spec(spec: str | None) -> str | None:
    """A backend spec (`KIND:MODEL@URL`) with the URL's credentials removed."""
    if spec is None or "@" not in spec:
        return spec
    head, _, url = spec.partition("@")
    return f"{head}@{redact_url(url)}"


def make_backend(spec: str, *, params: float | None = None, cache=None, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int | None = None, api_key: str | None = None,
                 max_error_rate: float = 0.5) -> Backend:
    """A backend from a spec: `vllm:PATH_OR_HUB_NAME`, `openai:MODEL[@BASE_URL]`,
    `openai-completions:MODEL@BASE_URL`, `openai-completions-raw:MODEL@BASE_URL` (a server
    started with `--logprobs-mode raw_logits`: the confidence is the max raw logit, S_os) or
    `tinylm:small|large` (the embedded default).

    Clients are imported lazily, so only the kind asked for must be installed. An OpenAI-style
    backend checks its server, key and model before the first request (`FatalBackendError`)."""
    kind, _, rest = spec.partition(":")
    if kind == "vllm":
        from generation.vllm_backend import VLLMBackend

        return VLLMBackend(rest, params=params, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, seed=seed)
    if kind in ("openai", "openai-completions", "openai-completions-raw"):
        from generation.openai_backend import OpenAIBackend

        model, _, base = rest.partition("@")
        if not model:
            raise ValueError(f"backend spec {spec!r} names no model")
        return OpenAIBackend(model, base_url=base or None, api_key=api_key,
                             params=params or 0.0, mode="chat" if kind == "openai" else
                             "completions", cache_path=cache, seed=seed,
                             max_error_rate=max_error_rate,
                             confidence="max_logit" if kind.endswith("-raw") else "top1_prob")
    if kind == "tinylm":
        from generation.tinylm import backend as tiny

        return tiny.load(rest)
    raise ValueError(f"unknown backend spec {spec!r} (vllm:…, openai:…, openai-completions:…, "
                     "openai-completions-raw:…, tinylm:small|large)")
