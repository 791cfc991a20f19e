"""Deterministic fake backends for generation tests (no model, no network)."""

from __future__ import annotations

import hashlib
import re

from generation.backends.base import StepRequest, StepResult, is_final_step


def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


def numbers(question: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", question)[:2])
    return a, b


class ScriptedBackend:
    """Solves "What is A+B?" in `n_steps` steps; wrong (off by one) when `wrong(key)` says so.

    Per token "max logits": 10 normally, 2 on the tokens of a wrong step (informative confidence).
    """

    def __init__(self, name: str, params: float, n_steps: int = 3, wrong_rate: float = 0.0,
                 fail_on: str | None = None, never_final: bool = False, empty_first: int = 0):
        self.name, self.params, self.n_steps = name, params, n_steps
        self.wrong_rate, self.fail_on, self.never_final = wrong_rate, fail_on, never_final
        self.empty_first = empty_first  # the first N requests per key come back empty ("\n\n")
        self.calls, self.tries = 0, {}

    def _wrong(self, key: str) -> bool:
        return (_h(key + self.name) % 1000) / 1000 < self.wrong_rate

    def _step(self, req: StepRequest, t: int, wrong_before: bool) -> tuple[str, bool]:
        a, b = numbers(req.question)
        if t < self.n_steps - 1 and not self.never_final:
            return f"Step {t + 1}: consider {a} and {b}.", False
        if self.never_final:
            return f"Step {t + 1}: still thinking about {a}.", False
        ans = a + b + (1 if wrong_before else 0)
        return f"So {a}+{b} = {ans}, \\boxed{{{ans}}}", True

    def generate(self, requests, *, whole=False, max_tokens=1024):
        self.calls += 1
        out = []
        for req in requests:
            if self.fail_on and self.fail_on in req.question:
                out.append(StepResult("", [], [], [], "max_logit", 0, 0, 0, "stop", False,
                                      error="server said no"))
                continue
            base = req.key.replace("/retry", "")
            self.tries[base] = self.tries.get(base, 0) + 1
            if not whole and self.tries[base] <= self.empty_first:
                out.append(StepResult("", [0], [""], [1.0], "max_logit", 20, 0, 1, "stop", False))
                continue
            t0 = len(req.steps)
            wrong = any("off" in s for s in req.steps) or self._wrong(req.key)
            texts, final = [], False
            t = t0
            while True:
                text, final = self._step(req, t, wrong)
                if wrong and not any("off" in s for s in req.steps + tuple(texts)):
                    text += " (off)"
                texts.append(text)
                t += 1
                if final or not whole or t > 50:
                    break
            text = "\n\n".join(texts)
            toks = text.split(" ")
            conf = [2.0 if "(off)" in text else 10.0] * len(toks)
            n_prompt = 20 + sum(len(s.split(" ")) for s in req.steps)
            out.append(StepResult(text, list(range(len(toks))), toks, conf, "max_logit", n_prompt,
                                  0, len(toks), "stop", is_final_step(text, "stop", False)))
        return out
