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

FEATURE_NAMES = ("confidence", "step_index", "step_length", "is_final", "difficulty")
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


def step_features(confidence: float, step_index: int, step_length: int, is_final: bool,
                  difficulty: float | None) -> list[float]:
    """The router's feature vector, in `FEATURE_NAMES` order (difficulty 0 when unknown)."""
    return [float(confidence), float(step_index), float(step_length), float(is_final),
            float(difficulty) if difficulty is not None else 0.0]
