"""The tiny models' answer streams (`generation.tinylm.streamer`, decision 97): one continuous
decode loop that pauses each row at its step's end."""

from __future__ import annotations

import asyncio

import pytest

from generation import main_job
from generation.backends import streams
from generation.backends.base import StepRequest
from generation.live import online, rules
from generation.tinylm import backend as tiny


class Stepwise:
    """The same model without `astream`: every answer goes step by step (`generate`)."""

    def __init__(self, inner):
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.temperature = inner.temperature

    def generate(self, reqs, *, whole=False, max_tokens=1024):
        return self.inner.generate(reqs, whole=whole, max_tokens=max_tokens)


class Coin:
    """Escalates a step when a hash of (problem, step) says so: decisions independent of the
    engine, so both paths face the same ones."""

    name, sticky, start_model = "coin", True, 0

    def decide(self, views):
        return [rules.Decision(1 if hash((v.problem.problem_id, len(v.steps))) % 4 == 0
                               else v.model) for v in views]


@pytest.fixture(scope="module")
def models():
    return [tiny.load("small"), tiny.load("large")]


def _route(backends, problems):
    engine = online.Engine(backends, Coin(), online.OnlineConfig(seed=3, **main_job.GEN_CONFIG))
    lives = [engine.admit(p) for p in problems]
    engine.run()
    return lives


def test_streamed_answers_are_the_stepwise_answers(models):
    problems, _ = main_job.problems_and_splits({"test": 40}, 9)
    got = _route(models, problems)
    want = _route([Stepwise(b) for b in models], problems)
    streamer = models[0]._streamer[1]

    def route(s):
        return [(p["model"], p["text"], p["kept"], p["cost"]["output_tokens"]) for p in s.pieces
                ] + [s.status]

    # Texts are defined equal (tokens keyed by position, decision 87); the logits come from
    # batches of other shapes, so another CPU's low bits may flip one sample near a tie.
    differ = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if route(g) != route(w)]
    assert len(differ) <= 1, [(route(got[i]), route(want[i])) for i in differ]
    steps = sum(len(w.steps) for w in want)
    assert streamer.calls < steps / 4  # one loop run for many answers' steps


def test_a_cancelled_stream_pays_its_partial_step_and_frees_its_row(models):
    small = models[0]
    problems, _ = main_job.problems_and_splits({"test": 3}, 5)

    async def run():
        answers = [small.astream(streams.Answer(StepRequest(f"c{i}", p.question, (), (), i),
                                                max_tokens=160, max_tokens_per_step=64))
                   for i, p in enumerate(problems)]
        first = await asyncio.gather(*(a.next() for a in answers))
        extra = await answers[0].close()  # paused at its step's end: nothing written past it
        rest = [await a.next() for a in answers[1:]]
        for a in answers[1:]:
            await a.close()
        return first, extra, rest, small._streamer[1]

    first, extra, rest, streamer = asyncio.run(run())
    assert all(r.error is None and r.text for r in first) and extra is None
    assert all(r is None or r.error is None for r in rest)
    assert all(s is None for s in streamer.slots)  # every row is free again
