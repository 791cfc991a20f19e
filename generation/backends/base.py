"""The one backend interface: "given these problems and their current step prefixes, generate
the next step (or the rest of the solution) with this model". Implementations import this
module; `generation.registry` builds them from specs (so no arrow points back here)."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Sequence
from typing import Protocol

STEP_DELIMITER = "\n\n"
TOP_LOGPROBS = 5  # candidates per token every backend asks for (what OpenAI's API returns)
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
    # The token distribution, per token (decision 91), as far as the backend returns it: the
    # sampled token's value, the TOP_LOGPROBS largest values (descending) — log-probabilities,
    # or raw logits when `confidence_kind` is "max_logit" and no entropies are given — and the
    # exact entropy where the backend saw the full logits (the tiny engine).
    logprobs: list[float] | None = None
    top_logprobs: list[list[float]] | None = None
    entropies: list[float] | None = None


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
