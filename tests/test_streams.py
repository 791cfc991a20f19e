"""Answers as streams of steps (`generation.backends.streams`, decision 94)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from generation.backends import streams
from generation.backends.base import StepRequest
from generation.backends.streams import StepCutter, Token

PIECES = ["a", "b", "1", "\n", "\n\n", "a\n", "\nb", "\n\na", " ", "\\boxed{7}", "x\n\n\ny"]


def _cut(texts):
    cutter, steps = StepCutter(), []
    for t in texts:
        out = cutter.feed(Token(t, 0.0, 0.0, [0.0]))
        if out is not None:
            steps.append(out)
    return steps, cutter.rest()


def _reference(full: str) -> list[str]:
    """Stepwise requests with the stop string, where an answer of blank lines (an empty step)
    is not a step: the parts between delimiters that hold any text, without blank lines
    before them."""
    out = []
    for part in full.split("\n\n"):
        if part.strip():
            start = len(part) - len(part.lstrip())
            out.append(part[part.rfind("\n", 0, start) + 1:].strip("\n"))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_cutter_cuts_where_the_stop_string_would_and_loses_no_token(seed):
    rng = np.random.default_rng(seed)
    texts = [PIECES[i] for i in rng.integers(0, len(PIECES), rng.integers(1, 40))]
    steps, (rest_tokens, rest_text) = _cut(texts)
    # every token belongs to exactly one step (or the rest), in order
    assert [t.text for toks, _ in steps for t in toks] + [t.text for t in rest_tokens] == texts
    got = [text for _, text in steps] + ([rest_text] if rest_text.strip() else [])
    assert got == _reference("".join(texts))
    # a step ends with the token that completes its delimiter
    assert all("\n" in toks[-1].text for toks, _ in steps)


def test_a_token_that_straddles_the_delimiter_ends_its_step_and_starts_the_next():
    steps, (rest, text) = _cut(["1 + 2", " = 3.\n\nSo", " 3"])
    assert [s[1] for s in steps] == ["1 + 2 = 3."] and len(steps[0][0]) == 2
    assert text == "So 3" and [t.text for t in rest] == [" 3"]


class _Counting:
    """A stepwise backend that writes 'step k' answers and counts its calls."""

    name, params = "counting", 1.0

    def __init__(self):
        self.calls, self.sizes = 0, []

    def generate(self, reqs, *, whole=False, max_tokens=1024):
        from generation.backends.base import StepResult
        self.calls += 1
        self.sizes.append(len(reqs))
        out = []
        for r in reqs:
            k = len(r.steps)
            text = f"step {k}" + (" \\boxed{1}" if k == 2 else "")
            out.append(StepResult(text, [k], [text], [1.0], "max_logit", 5, 0, 1, "stop",
                                  k == 2))
        return out


def test_the_batcher_gathers_concurrent_answers_into_one_call_per_step():
    be = _Counting()

    async def run():
        batcher = streams.StepBatcher(be)
        answers = [streams.StepwiseStream(batcher, streams.Answer(
            StepRequest(f"p{i}", "q", (), (), i))) for i in range(10)]
        return await asyncio.gather(*(streams.read_all(a, 8, 100) for a in answers))

    out = asyncio.run(run())
    assert all([r.text for r in steps] == ["step 0", "step 1", "step 2 \\boxed{1}"]
               and status == "ok" for steps, status in out)
    assert be.calls == 3 and be.sizes == [10, 10, 10]  # one call per step, not per answer
