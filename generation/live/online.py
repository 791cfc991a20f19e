"""Online routing: live generation of a set of problems with any routing rule, one asyncio
task per answer (`Engine`, decision 94).

Every live problem has a current model, which writes the answer as one stream of steps
(`generation.backends.streams`); the rule (`generation.live.rules`) looks at each completed
step (a draft) and answers with the model that should own it:

- the same model → the draft is accepted and the stream goes on;
- a larger model k' → the draft is discarded (its tokens, and whatever the stream wrote past
  it before the cancel arrived, are still paid for) and k' writes the step from the same
  prefix. A *sticky* rule then stays with k'; when k' is the largest model it writes the rest
  of the solution in one request, exactly like a leaf of a trace tree, so offline and online
  costs are comparable. A *per-step* rule lets k' write only that step and returns to model 0.

A rule may score drafts with a model of its own (RSD's process reward model, SpecReason's judge);
that compute is kept in a separate `scorer_cost` column, never in the generation cost. Each
problem's record (`jaxroute.records`) keeps every generated piece — text, model, features, the
rule's score and decision, whether it was kept — with its cost in the trace format's fields,
and the number of upstream requests its answer opened.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from generation.backends import costs, streams
from generation.backends.base import STEP_DELIMITER, Backend, StepRequest, StepResult, prefix_text
from generation.live.rules import Decision, Rule, View
from generation.traces import features, tracegen
from generation.traces.answers import AnswerChecker, Verdict
from generation.traces.datasets import Problem
from jaxroute import accounting


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    max_steps: int = 30
    max_tokens_per_step: int = 1024
    max_tokens_per_solution: int = 4096
    seed: int = 0
    # The drafts' features, in this order: the trace set's, so rules fitted on it (STEER, a
    # router) read theirs; a rule with `feature_names` of its own (the router) uses those.
    feature_names: tuple[str, ...] = features.FEATURE_NAMES


@dataclasses.dataclass
class Live:
    """One problem being routed: its current model, accepted steps and every generated piece."""

    problem: Problem
    model: int
    seed: int = 0  # base of every model's sample stream on this problem (decision 87)
    max_tokens: int = 4096  # guard: generated tokens of a segment (the trees' rule)
    budget: int | None = None  # a served request's max_tokens: the whole answer, across models
    truncated: bool = False  # a piece of the answer was cut by a token limit (finish "length")
    steps: list[str] = dataclasses.field(default_factory=list)
    owners: list[int] = dataclasses.field(default_factory=list)  # model of each accepted step
    ids: list[int] = dataclasses.field(default_factory=list)  # accepted token ids
    span: features.MathSpanState = dataclasses.field(default_factory=features.MathSpanState)
    pieces: list[dict] = dataclasses.field(default_factory=list)
    scorer: list[dict] = dataclasses.field(default_factory=list)
    tokens: int = 0
    rounds: int = 0  # drafts this problem has been through
    requests: int = 0  # upstream requests (answer streams and single steps) it opened
    status: str = "ok"
    done: bool = False
    final_text: str | None = None
    on_step: Callable[[dict], None] | None = None  # told of every accepted step (streaming)

    def text(self) -> str:
        """The solution so far: the accepted steps, or the largest model's rest of it."""
        return self.final_text if self.final_text is not None else prefix_text(self.steps)

    def answer(self) -> str:
        """The solution as an application receives it (and a stream delivers it): the accepted
        steps joined by the delimiter, without the trailing one a continuation prompt needs."""
        return self.final_text if self.final_text is not None else \
            STEP_DELIMITER.join(self.steps)


def _answer(s: Live, model: int, cfg: OnlineConfig, whole: bool) -> streams.Answer:
    """Model `model`'s answer from `s`'s accepted steps: continued by token ids only when every
    accepted step came from this very model (no re-tokenisation drift), otherwise by text, as a
    trace tree's child segment does; drawn from the model's sample stream on this problem, as
    trace generation draws it (decision 87)."""
    ids = tuple(s.ids) if all(o == model for o in s.owners) else None
    pid = s.problem.problem_id
    seeds = [tracegen.stream_seed(pid, model, s.seed, attempt=a)
             for a in range(streams.EMPTY_RETRIES + 1)]
    req = StepRequest(f"{pid}/m{model}", s.problem.question, tuple(s.steps), ids, seeds[0])
    budget = None if s.budget is None else max(1, s.budget - s.tokens)
    return streams.Answer(req, tuple(seeds[1:]), s.max_tokens, cfg.max_tokens_per_step,
                          whole=whole, budget=budget)


def _features_of(s: Live, r: StepResult, names: Sequence[str]
                 ) -> tuple[np.ndarray, features.MathSpanState]:
    """A draft's feature vector (`names`: the router's, or the trace set's), computed as trace
    generation computes it, and the span state after the draft (the problem's own state is left
    as it is)."""
    vector, span = features.step_vector(names, r, len(s.steps), s.problem.difficulty,
                                        copy.deepcopy(s.span))
    return np.asarray(vector, np.float64), span


def _piece(r: StepResult, model: int, params: float, **extra) -> dict:
    return {"model": model, "text": r.text, "cost": costs.generation_cost(r, params), **extra}


class _Decider:
    """Gathers the drafts of every answer waiting for a decision into one `rule.decide` call
    (`streams.Gatherer`: a worker thread, since a rule may run a model of its own)."""

    def __init__(self, rule: Rule):
        self.rule, self.seconds = rule, 0.0
        self._gather = streams.Gatherer(self._timed)

    async def decide(self, view: View) -> Decision:
        return await self._gather.submit(view)

    def _timed(self, views: list[View]) -> list[Decision]:
        t0 = time.perf_counter()
        try:
            return self.rule.decide(views)
        finally:
            self.seconds += time.perf_counter() - t0


class Engine:
    """Live routing as one asyncio task per answer (decision 94).

    An answer's current model writes it as one answer stream (`generation.backends.streams`:
    one streaming request upstream, or batched step calls in process); the rule decides on each
    completed step as the stream goes on (every waiting answer's draft in one `decide` call).
    Accepted: read on. Escalated: the stream is closed (what the model wrote beyond the step is
    paid for) and the larger model takes over — a sticky rule's largest model writes the rest
    in one request, exactly like a leaf of a trace tree; a per-step rule's model writes that
    step alone and the answer goes back to model 0, in a new stream from the new prefix.
    """

    def __init__(self, backends: Sequence[Backend], rule: Rule, cfg: OnlineConfig):
        self.backends, self.rule, self.cfg = list(backends), rule, cfg
        self.feature_names = tuple(getattr(rule, "feature_names", None) or cfg.feature_names)
        self.last = len(self.backends) - 1
        self.live: list[Live] = []
        self._decider = _Decider(rule)
        self._batchers: list[streams.StepBatcher] = [streams.StepBatcher(b)
                                                     for b in self.backends]

    @property
    def decide_seconds(self) -> float:
        """Time in the rule's decisions (the router's share)."""
        return self._decider.seconds

    def admit(self, problem: Problem, *, seed: int | None = None, max_tokens: int | None = None,
              on_step: Callable[[dict], None] | None = None) -> Live:
        """Add a problem (`route` it, or `run` every admitted one). `max_tokens`: a budget for
        the whole answer across models (a served request's; decision 90) — None keeps the trees'
        per-segment guard only, so a live run writes what its replay on the trees says."""
        s = Live(problem, self.rule.start_model, self.cfg.seed if seed is None else seed,
                 self.cfg.max_tokens_per_solution, budget=max_tokens, on_step=on_step)
        self.live.append(s)
        return s

    def run(self, progress: Callable[[int], None] | None = None) -> list[Live]:
        """Route every admitted problem to its end (from synchronous code)."""
        async def run():
            try:
                return await self.route_all(self.live, progress)
            finally:
                await streams.close_clients(self.backends)

        return asyncio.run(run())

    async def route_all(self, lives: Sequence[Live],
                        progress: Callable[[int], None] | None = None) -> list[Live]:
        tasks = [asyncio.ensure_future(self.route(s)) for s in lives]
        try:
            for n, t in enumerate(asyncio.as_completed(tasks), 1):
                await t
                if progress:
                    progress(n)
        finally:  # one failed: the others stop too (their streams are closed)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return list(lives)

    async def route(self, s: Live) -> Live:
        """Route one answer to its end. A cancelled task marks it "cancelled"; anything an
        upstream or the rule raises propagates (a fatal backend error stops a run at once; the
        server turns it into this request's error)."""
        try:
            while not s.done:
                if s.model == self.last and self.rule.sticky:
                    await self._rest(s)
                else:
                    await self._stream(s)
        except asyncio.CancelledError:
            s.status, s.done = "cancelled", True
            raise
        return s

    def _open(self, s: Live, m: int, whole: bool) -> streams.AnswerStream:
        s.requests += 1
        return streams.open_answer(self.backends[m], self._batchers[m],
                                   _answer(s, m, self.cfg, whole))

    async def _rest(self, s: Live) -> None:
        """The largest model writes the rest of the solution in one piece (a sticky rule)."""
        m = s.model
        stream = self._open(s, m, whole=True)
        try:
            r = await stream.next()
        finally:
            await stream.close()
        params = self.backends[m].params
        if r is None or r.error is not None:
            s.pieces.append(_piece(r or streams.error_result("no answer"), m, params,
                                   kept=False))
            s.status, s.done = f"error: {r.error if r else 'no answer'}", True
            return
        s.pieces.append(_piece(r, m, params, kept=True, whole=True))
        s.final_text, s.done = prefix_text(s.steps) + r.text, True
        s.tokens += r.completion_tokens
        s.truncated |= r.finish_reason == "length"
        _tell(s, (STEP_DELIMITER if s.steps else "") + r.text, m)

    async def _stream(self, s: Live) -> None:
        """Model `s.model` writes on, step by step, until it ends, or the rule hands a step
        to a larger model."""
        cfg, rule, m = self.cfg, self.rule, s.model
        params = self.backends[m].params
        stream, redo = self._open(s, m, whole=False), None
        try:
            while not s.done:
                if s.rounds > cfg.max_steps:
                    s.status, s.done = "max_steps", True
                    break
                r = await stream.next()
                if r is None:  # the stream ended on empty steps (decision 75)
                    s.status, s.done = "empty_step", True
                    break
                if streams.is_empty(r):
                    s.pieces.append(_piece(r, m, params, kept=False, empty=True))
                    continue
                if r.error is not None:
                    s.status, s.done = f"error: {r.error}", True
                    s.pieces.append(_piece(r, m, params, kept=False))
                    break
                f, span = _features_of(s, r, self.feature_names)
                d = await self._decider.decide(View(s.problem, tuple(s.steps), r, m, f))
                if d.model < m or d.model > self.last:
                    raise ValueError(f"rule {rule.name!r} answered model {d.model} for a step "
                                     f"of model {m} (must be in [{m}, {self.last}])")
                if d.scorer_cost:
                    s.scorer.append(d.scorer_cost)
                keep = d.model == m
                s.pieces.append(_piece(r, m, params, kept=keep,
                                       features=[float(x) for x in f], decision=d.model,
                                       score=d.score))
                s.rounds += 1
                if keep:
                    _accept(s, r, m, cfg, span)
                elif rule.sticky:
                    s.model = d.model  # it writes this step on (the rest, if largest)
                    break
                else:
                    redo = d.model
                    break
        finally:
            extra = await stream.close()
            if extra is not None:  # written past the decision before the cancel arrived
                s.pieces.append(_piece(extra, m, params, kept=False, overrun=True))
        if redo is not None:  # a per-step rule: model `redo` writes this one step
            one = self._open(s, redo, whole=False)
            try:
                r = await one.next()
            finally:
                await one.close()
            r = r or streams.error_result("no answer")
            s.pieces.append(_piece(r, redo, self.backends[redo].params,
                                   kept=r.error is None, replaces=True))
            if r.error is not None:
                s.status, s.done = f"error: {r.error}", True
            else:
                _accept(s, r, redo, cfg)


def run_online(problems: Sequence[Problem], backends: Sequence[Backend], rule: Rule,
               checker: AnswerChecker, cfg: OnlineConfig = OnlineConfig(),
               progress: Callable[[int], None] | None = None) -> list[dict]:
    """Route `problems` live with `rule` (an `Engine` with every problem admitted at once); one
    record per problem (see the module docstring)."""
    engine = Engine(backends, rule, cfg)
    live = [engine.admit(p) for p in problems]
    engine.run(progress)
    verdicts = checker.check_many([(s.text(), s.problem.gold, s.problem.dataset) for s in live])
    return [{"problem_id": s.problem.problem_id, "dataset": s.problem.dataset,
             "difficulty": s.problem.difficulty, "method": rule.name,
             "correct": v == Verdict.CORRECT, "verdict": str(v), "status": s.status,
             "pieces": s.pieces, "scorer_cost": accounting.sum_costs(s.scorer),
             "requests": s.requests}
            for s, v in zip(live, verdicts, strict=True)]


def _tell(s: Live, text: str, model: int) -> None:
    """Tell a streaming consumer of a piece of solution text just accepted."""
    if s.on_step is not None:
        s.on_step({"text": text, "model": model})


def _accept(s: Live, r: StepResult, model: int, cfg: OnlineConfig,
            span: features.MathSpanState | None = None) -> None:
    """Append an accepted step; `span`: its span state if the draft's features were computed."""
    if span is None:  # a larger model's step: only the math-span state moves on
        span = features.math_mask(r.tokens, copy.deepcopy(s.span))[1] if r.tokens else s.span
    s.span = span
    _tell(s, (STEP_DELIMITER if s.steps else "") + r.text, model)
    s.steps.append(r.text)
    s.owners.append(model)
    s.ids.extend(r.token_ids)
    s.tokens += r.completion_tokens
    s.truncated |= r.finish_reason == "length"
    if r.is_final:
        s.done = True
    elif len(s.steps) >= cfg.max_steps:
        s.status, s.done = "max_steps", True
    elif s.tokens >= min(s.max_tokens, s.budget or s.max_tokens):
        s.status, s.done = "max_tokens", True
