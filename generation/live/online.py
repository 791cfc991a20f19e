"""Online routing: live stepwise generation for a batch of problems with any routing rule.

Every live problem has a current model. Each round, the current models write the next step of
their problems (one batched call per model); the rule (`generation.live.rules`) looks at each draft
and answers with the model that should own that step:

- the same model → the draft is accepted;
- a larger model k' → the draft is discarded (its tokens are still paid for) and k' writes the
  step from the same prefix. A *sticky* rule then stays with k'; when k' is the largest model it
  writes the rest of the solution in one call, exactly like a leaf of a trace tree, so offline
  and online costs are comparable. A *per-step* rule lets k' write only that step and returns
  to model 0.

A rule may score drafts with a model of its own (RSD's process reward model, SpecReason's judge);
that compute is kept in a separate `scorer_cost` column, never in the generation cost. Each
problem's record (`jaxroute.records`) keeps every generated piece — text, model, features, the
rule's score and decision, whether it was kept — with its cost in the trace format's fields.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from generation.backends import costs
from generation.backends.base import STEP_DELIMITER, Backend, StepRequest, StepResult, prefix_text
from generation.live.rules import Rule, View
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


EMPTY_RETRIES = tracegen.EMPTY_RETRIES


def _is_empty(r: StepResult) -> bool:
    return r.error is None and not r.is_final and not r.text.strip()


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
    rounds: int = 0  # rounds this problem has been through (its request keys count them)
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


def _request(s: Live, model: int, attempt: int = 0) -> StepRequest:
    # Continue by token ids only when every accepted step came from this very model (no
    # re-tokenisation drift); otherwise by text, as a trace tree's child segment does.
    ids = tuple(s.ids) if all(o == model for o in s.owners) else None
    key = f"{s.problem.problem_id}/{len(s.steps)}/{model}" + "/retry" * attempt
    # The model's sample stream on this problem, as trace generation draws it (decision 87).
    return StepRequest(key, s.problem.question, tuple(s.steps), ids,
                       tracegen.stream_seed(s.problem.problem_id, model, s.seed, attempt=attempt))


def _features_of(s: Live, r: StepResult, names: Sequence[str]
                 ) -> tuple[np.ndarray, features.MathSpanState]:
    """A draft's feature vector (`names`: the router's, or the trace set's), computed as trace
    generation computes it, and the span state after the draft (the problem's own state is left
    as it is)."""
    vector, span = features.step_vector(names, r, len(s.steps), s.problem.difficulty,
                                        copy.deepcopy(s.span))
    return np.asarray(vector, np.float64), span


def _isolated(backend: Backend, reqs: list[StepRequest], whole: bool, limit: int
              ) -> list[StepResult]:
    """`backend.generate(reqs)`, where a request the backend refuses (`ValueError`: bad input
    that a batched in-process call raises for the whole batch) fails alone — as its own
    `StepResult.error` — and never takes its batch mates down with it (decision 83)."""
    try:
        return backend.generate(reqs, whole=whole, max_tokens=limit)
    except ValueError as e:
        if len(reqs) == 1:
            return [StepResult("", [], [], [], "max_logit", 0, 0, 0, "error", True,
                               error=f"request {reqs[0].key}: {e}")]
    return [r for req in reqs for r in _isolated(backend, [req], whole, limit)]


def _piece(r: StepResult, model: int, params: float, **extra) -> dict:
    return {"model": model, "text": r.text, "cost": costs.generation_cost(r, params), **extra}


class Engine:
    """The stepwise loop for any set of problems with one rule — problems may join between
    rounds (the serving layer's continuous batching; `run_online` admits all at once).

    Each `round()`: the current models write the next step of their live problems (one batched
    call per model and limit; the largest model, under a sticky rule, the rest), empty drafts
    are asked again, the rule decides for every draft in one call, and drafts are accepted or
    handed to the larger model.
    """

    def __init__(self, backends: Sequence[Backend], rule: Rule, cfg: OnlineConfig):
        self.backends, self.rule, self.cfg = list(backends), rule, cfg
        self.feature_names = tuple(getattr(rule, "feature_names", None) or cfg.feature_names)
        self.last = len(self.backends) - 1
        self.live: list[Live] = []
        self.decide_seconds = 0.0  # time in the rule's decisions (the router's share)

    def admit(self, problem: Problem, *, seed: int | None = None, max_tokens: int | None = None,
              on_step: Callable[[dict], None] | None = None) -> Live:
        """Add a problem. `max_tokens`: a budget for the whole answer across models (a served
        request's; decision 90) — None keeps the trees' per-segment guard only, so a live run
        writes what its replay on the trees says."""
        s = Live(problem, self.rule.start_model, self.cfg.seed if seed is None else seed,
                 self.cfg.max_tokens_per_solution, budget=max_tokens, on_step=on_step)
        self.live.append(s)
        return s

    def active(self) -> list[Live]:
        return [s for s in self.live if not s.done]

    def collect(self) -> list[Live]:
        """Remove and return the finished problems."""
        done = [s for s in self.live if s.done]
        self.live = [s for s in self.live if not s.done]
        return done

    def _generate(self, group: list[Live], m: int, whole: bool, attempt: int = 0
                  ) -> list[StepResult]:
        """Batched calls of model m for `group`, one per distinct token limit."""
        cfg, out = self.cfg, {}
        limits = {}
        for s in group:
            limit = s.max_tokens if whole else min(cfg.max_tokens_per_step, s.max_tokens)
            if s.budget is not None:  # what the answer's budget leaves
                limit = max(1, min(limit, s.budget - s.tokens))
            limits.setdefault(limit, []).append(s)
        for limit, members in limits.items():
            reqs = [_request(s, m, attempt) for s in members]
            res = _isolated(self.backends[m], reqs, whole, limit)
            out.update({id(s): r for s, r in zip(members, res, strict=True)})
        return [out[id(s)] for s in group]

    def _retry_empty(self, active: list[Live], drafts: dict[int, StepResult]) -> None:
        """An empty draft ("\\n\\n" first) is asked again with a new seed, at most twice, and
        paid for (decision 75); still empty, the solution ends there."""
        for attempt in range(1, EMPTY_RETRIES + 1):
            empty = [s for s in active if _is_empty(drafts[id(s)])]
            for m in sorted({s.model for s in empty}):
                group = [s for s in empty if s.model == m]
                for s, r in zip(group, self._generate(group, m, False, attempt), strict=True):
                    s.pieces.append(_piece(drafts[id(s)], m, self.backends[m].params,
                                           kept=False, empty=True))
                    drafts[id(s)] = r

    def round(self) -> list[Live]:
        """One round over every live problem; returns (and removes) those that finished."""
        cfg, rule, backends, last = self.cfg, self.rule, self.backends, self.last
        active = self.active()
        for s in active:
            if s.rounds > cfg.max_steps:
                s.status, s.done = "max_steps", True
        active = [s for s in active if not s.done]
        # 1. The current models write their next step (the largest, when sticky: the rest).
        drafts: dict[int, StepResult] = {}
        for m in sorted({s.model for s in active}):
            group = [s for s in active if s.model == m]
            for s, r in zip(group, self._generate(group, m, m == last and rule.sticky),
                            strict=True):
                drafts[id(s)] = r
        self._retry_empty(active, drafts)
        # 2. The rule looks at every draft of a model that may still hand over.
        views, drafted = [], []
        for s in active:
            r = drafts[id(s)]
            if _is_empty(r):
                s.pieces.append(_piece(r, s.model, backends[s.model].params, kept=False,
                                       empty=True))
                s.status, s.done = "empty_step", True
                continue
            if r.error is not None:
                s.status, s.done = f"error: {r.error}", True
                s.pieces.append(_piece(r, s.model, backends[s.model].params, kept=False))
                continue
            if s.model == last and rule.sticky:  # the rest of the solution, in one piece
                s.pieces.append(_piece(r, s.model, backends[s.model].params, kept=True,
                                       whole=True))
                s.final_text, s.done = prefix_text(s.steps) + r.text, True
                s.tokens += r.completion_tokens
                s.truncated |= r.finish_reason == "length"
                _tell(s, (STEP_DELIMITER if s.steps else "") + r.text, s.model)
                continue
            f, span = _features_of(s, r, self.feature_names)
            views.append(View(s.problem, tuple(s.steps), r, s.model, f))
            drafted.append((s, span))
        t0 = time.perf_counter()
        decisions = rule.decide(views) if views else []
        self.decide_seconds += time.perf_counter() - t0
        # 3. Apply: accept, or discard and let the larger model write the step.
        redo: dict[int, list[Live]] = {}
        for (s, span), v, d in zip(drafted, views, decisions, strict=True):
            if d.scorer_cost:
                s.scorer.append(d.scorer_cost)
            keep = d.model == v.model
            s.pieces.append(_piece(v.draft, v.model, backends[v.model].params, kept=keep,
                                   features=[float(x) for x in v.features], decision=d.model,
                                   score=d.score))
            if d.model < v.model or d.model > last:
                raise ValueError(f"rule {rule.name!r} answered model {d.model} for a step of "
                                 f"model {v.model} (must be in [{v.model}, {last}])")
            if keep:
                _accept(s, v.draft, v.model, cfg, span)
            elif rule.sticky:
                s.model = d.model  # it rewrites this step next round (the rest, if largest)
            else:
                redo.setdefault(d.model, []).append(s)
        for m, group in redo.items():
            for s, r in zip(group, self._generate(group, m, False), strict=True):
                s.pieces.append(_piece(r, m, backends[m].params, kept=r.error is None,
                                       replaces=True))
                if r.error is not None:
                    s.status, s.done = f"error: {r.error}", True
                else:
                    _accept(s, r, m, cfg)
        for s in active:
            s.rounds += 1
        return self.collect()


def run_online(problems: Sequence[Problem], backends: Sequence[Backend], rule: Rule,
               checker: AnswerChecker, cfg: OnlineConfig = OnlineConfig(),
               progress: Callable[[int], None] | None = None) -> list[dict]:
    """Route `problems` live with `rule` (an `Engine` with every problem admitted at once); one
    record per problem (see the module docstring)."""
    engine = Engine(backends, rule, cfg)
    live = [engine.admit(p) for p in problems]
    finished = 0
    while engine.active():
        finished += len(engine.round())
        if progress:
            progress(finished)
    verdicts = checker.check_many([(s.text(), s.problem.gold, s.problem.dataset) for s in live])
    return [{"problem_id": s.problem.problem_id, "dataset": s.problem.dataset,
             "difficulty": s.problem.difficulty, "method": rule.name,
             "correct": v == Verdict.CORRECT, "verdict": str(v), "status": s.status,
             "pieces": s.pieces, "scorer_cost": accounting.sum_costs(s.scorer)}
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
