"""Per-step router features from token-level confidence data (seed Sec. 4.3).

Math-token rule (decision 32; STEER's own rule is unpublished). A generated token is a math
token if its text, stripped of spaces, is non-empty and
  (a) contains a digit, or
  (b) is a LaTeX command (`\\frac`, `\\sqrt`, `\\times`, …), or
  (c) consists only of operator/bracket characters `+-*/=^_<>()[]{}|!%` or `×÷±≤≥≠`, or
  (d) lies inside a math span (`$…$`, `$$…$$`, `\\(…\\)`, `\\[…\\]`, `\\boxed{…}`); the span
      state is carried across the whole trace, not reset per step.
Punctuation-only tokens (`.`, `,`, `:`, `;`, `.\\n\\n` — the step delimiter often fuses with
them) count only inside a math span (generation.md §4, decision 74). Pure whitespace and the `$`
delimiters themselves are never math tokens.

S_os = mean over math tokens of the max raw logit (open models);
S_API = min over math tokens of the top-1 probability among the returned top-5 (APIs).
A step with no math token uses all of its tokens and sets `no_math = True` (explicit, logged).
The same statistic over every token (`Confidence.all_tokens`) is logged beside it, so the choice
can be measured.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxroute.errors import InputError

# What a router sees of a step (decision 91): S_os/S_API, the small model's own token
# distribution (`distribution_stats`), and where the step stands. Trace sets and routers name
# their features; `step_vector` computes any of these by name (older sets and routers carry the
# first five only, `LEGACY_FEATURE_NAMES`).
FEATURE_NAMES = ("confidence", "min_logprob", "low3_logprob", "neg_entropy", "min_margin",
                 "step_index", "step_length", "is_final", "difficulty")
LEGACY_FEATURE_NAMES = ("confidence", "step_index", "step_length", "is_final", "difficulty")
_OPS = set("+-*/=^_<>()[]{}|!%×÷±≤≥≠")
_PUNCT = set(".,:;?")  # maths only inside a math span
_CMD = re.compile(r"^\\[A-Za-z]+")


@dataclasses.dataclass
class MathSpanState:
    """Open math delimiters carried across tokens and steps."""

    dollars: int = 0  # 1 inside $…$, 2 inside $$…$$
    paren: bool = False  # inside \( … \) or \[ … \]
    boxed_depth: int = 0  # brace depth inside \boxed{…}
    pending_box: bool = False  # saw \boxed, its "{" not yet

    @property
    def inside(self) -> bool:
        return self.dollars > 0 or self.paren or self.boxed_depth > 0 or self.pending_box

    def feed(self, text: str) -> None:
        j = 0
        while j < len(text):
            two = text[j:j + 2]
            if two == "$$":
                self.dollars = 0 if self.dollars == 2 else 2
                j += 2
            elif text[j] == "$":
                self.dollars = {0: 1, 1: 0, 2: 2}[self.dollars]
                j += 1
            elif two in ("\\(", "\\["):
                self.paren, j = True, j + 2
            elif two in ("\\)", "\\]"):
                self.paren, j = False, j + 2
            elif text.startswith("\\boxed", j):
                self.pending_box, j = True, j + 6
            elif text[j] == "{" and (self.pending_box or self.boxed_depth > 0):
                self.boxed_depth += 1
                self.pending_box = False
                j += 1
            elif text[j] == "}" and self.boxed_depth > 0:
                self.boxed_depth -= 1
                j += 1
            else:
                j += 1


def math_mask(tokens: list[str], state: MathSpanState | None = None
              ) -> tuple[np.ndarray, MathSpanState]:
    """`[L]` bool math-token flags for decoded token strings, and the updated span state."""
    state = state or MathSpanState()
    out = np.zeros(len(tokens), bool)
    for i, tok in enumerate(tokens):
        s = tok.strip()
        inside_before = state.inside
        state.feed(tok)
        if not s or set(s) <= {"$"}:
            continue
        inside = inside_before or state.inside
        if set(s) <= _PUNCT:
            out[i] = inside
            continue
        out[i] = any(c.isdigit() for c in s) or bool(_CMD.match(s)) or set(s) <= _OPS or inside
    return out, state


@dataclasses.dataclass(frozen=True)
class Confidence:
    value: float
    math_tokens: int  # |M_i| (0 ⇒ all tokens were used)
    no_math: bool
    all_tokens: float = float("nan")  # the same statistic over every token of the step


def _over_math(values, mask: np.ndarray, reduce) -> Confidence:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise InputError("empty step: no tokens to score")
    use = mask if mask.any() else np.ones_like(mask)  # no math token: use every token
    return Confidence(float(reduce(values[use])), int(mask.sum()), not mask.any(),
                      float(reduce(values)))


def s_os(max_logits: np.ndarray, mask: np.ndarray) -> Confidence:
    """Mean of the per-token max raw logit over math tokens (all tokens if there are none)."""
    return _over_math(max_logits, mask, np.mean)


def s_api(top1_probs: np.ndarray, mask: np.ndarray) -> Confidence:
    """Minimum top-1 probability over math tokens (all tokens if there are none)."""
    return _over_math(top1_probs, mask, np.min)


def step_confidence(tokens: list[str], confidence, kind: str, state: MathSpanState
                    ) -> tuple[Confidence, MathSpanState]:
    """S_os (`kind == "max_logit"`) or S_API of a generated step over its maths tokens, and the
    span state after it (`state` is advanced in place). Shared by trace generation and online
    routing, so a router sees the same features in both."""
    mask, state = math_mask(tokens, state)
    score = s_os if kind == "max_logit" else s_api
    return score(np.asarray(confidence), mask), state


# ------------------------------------------------------------------------------------------------
# What the small model's own token distribution says about a step (decision 91)

# Statistics of the sampled tokens' distribution over a step; higher = more confident for all.
DISTRIBUTION_FEATURES = ("min_logprob", "low3_logprob", "neg_entropy", "min_margin")
LOWEST_K = 3  # low3_logprob: the mean log-prob of the step's 3 least likely sampled tokens
NO_MARGIN = 30.0  # a token whose runner-up is unknown (one candidate returned): a sure token


def distribution_stats(r) -> dict[str, float]:
    """`min_logprob`, `low3_logprob`, `neg_entropy`, `min_margin` of a step, from what its
    backend returned per token (`StepResult.logprobs`, `.top_logprobs`, `.entropies`):

    - min_logprob: the lowest log-probability of a sampled token in the step;
    - low3_logprob: the mean of its `LOWEST_K` lowest (DeepConf's lowest-group confidence);
    - neg_entropy: minus the mean next-token entropy — exact where the backend saw the full
      logits (the tiny engine), else the top-k estimate Σ_top −p log p − r log r with r the
      mass outside the top k (APIs return 5);
    - min_margin: the smallest top-1 − top-2 log-probability gap (RelayGen's margin).
    Without per-token log-probabilities (an old backend) every statistic is 0."""
    if not r.logprobs or not r.top_logprobs:
        return dict.fromkeys(DISTRIBUTION_FEATURES, 0.0)
    sampled = np.asarray(r.logprobs, np.float64)  # [L]
    k = max(len(t) for t in r.top_logprobs)
    top = np.full((len(sampled), k), -np.inf)  # [L, k] descending
    for i, t in enumerate(r.top_logprobs):
        top[i, :len(t)] = sorted(t, reverse=True)
    top[:, 0] = np.maximum(top[:, 0], sampled)  # no candidate returned: the sampled one
    if r.confidence_kind == "max_logit" and r.entropies is None:
        # Raw logits (vLLM's raw_logits mode): normalised over the returned candidates and the
        # sampled token, an estimate that can only be too confident (the rest of the
        # vocabulary is left out).
        lse = np.logaddexp.reduce(top, axis=-1)
        outside = sampled < np.min(np.where(np.isfinite(top), top, np.inf), -1) - 1e-6
        lse = np.where(outside, np.logaddexp(lse, sampled), lse)
        top, sampled = top - lse[:, None], sampled - lse
    low = np.sort(sampled)[:LOWEST_K]
    if r.entropies is not None:
        ent = np.asarray(r.entropies, np.float64)
    else:
        p = np.exp(top)
        rest = np.clip(1.0 - p.sum(-1), 1e-12, 1.0)
        ent = -(np.where(p > 0, p * top, 0.0)).sum(-1) - rest * np.log(rest)
    margin = np.where(np.isfinite(top[:, 1]), top[:, 0] - top[:, 1], NO_MARGIN) if k > 1 \
        else np.full(len(top), NO_MARGIN)
    return {"min_logprob": float(sampled.min()), "low3_logprob": float(low.mean()),
            "neg_entropy": float(-ent.mean()), "min_margin": float(np.minimum(margin, NO_MARGIN)
                                                                   .min())}


def step_vector(names, r, step_index: int, difficulty: float | None, state: MathSpanState
                ) -> tuple[list[float], MathSpanState]:
    """The router's features of a generated step `r` (a `StepResult`), in the order of `names`
    (a trace set's or a router's `feature_names`; `FEATURE_NAMES` by default), and the math-span
    state after it (`state` is advanced in place). The one place trace generation, live routing
    and the server compute features, so a router sees the same numbers in all three."""
    if r.tokens:
        conf, state = step_confidence(r.tokens, r.confidence, r.confidence_kind, state)
        value = conf.value
    else:
        value = 0.0
    have = {"confidence": float(value), "step_index": float(step_index),
            "step_length": float(r.completion_tokens), "is_final": float(r.is_final),
            "difficulty": float(difficulty) if difficulty is not None else 0.0,
            **distribution_stats(r)}
    unknown = [n for n in names if n not in have]
    if unknown:
        raise InputError(f"unknown step features {unknown}; known: {sorted(have)}")
    return [have[n] for n in names], state


def check_known(names, where: str) -> None:
    """Refuse (`InputError`) a router whose features this generation layer cannot compute."""
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise InputError(f"{where}: the router reads features {unknown} that this version does "
                         f"not compute (it computes {list(FEATURE_NAMES)})")
