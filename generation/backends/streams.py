"""An answer as a stream of steps (decision 94): what the live engine and trace generation
consume, whatever the backend.

A backend writes a model's answer from a prefix (`StepRequest`) and hands it over step by step:
`open_answer(...)` returns an `AnswerStream` whose `next()` gives each completed step (a
`StepResult`, delimiter stripped) and `close()` ends it — cancelling what the backend is still
writing and returning the piece that was produced but never handed over (its cost is paid).

Two ways to produce it, one contract (the same request gives the same steps either way the
consumer reads them: live, with a cancel; or trace generation, to the end):

- **one streaming request** (`backend.astream`, the OpenAI-compatible backend): the upstream
  writes the whole answer in one request; `StepCutter` cuts its tokens into steps as they
  arrive, where a stepwise request's stop string would have cut them;
- **stepwise** (every other backend: the in-process engines): one batched call per step through
  a `StepBatcher`, which gathers the step requests of all concurrent answers of one model into
  one `generate` call, run in a worker thread so the event loop stays free. An empty step is
  asked again with a fresh seed (decision 75), as trace generation always did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from generation.backends.base import (
    STEP_DELIMITER,
    Backend,
    StepRequest,
    StepResult,
    is_final_step,
)

EMPTY_RETRIES = 2  # an empty step ("\\n\\n" first) is asked again at most twice (decision 75)

# One in-process model computation at a time (worker threads of every engine in the process):
# XLA already uses every core for one, and two at once hold two batches' buffers (decision 81).
IN_PROCESS = threading.Lock()


def is_empty(r: StepResult) -> bool:
    """A step with no text that does not end the solution (asked again, decision 75)."""
    return r.error is None and not r.is_final and not r.text.strip()


def error_result(message: str, kind: str = "max_logit") -> StepResult:
    return StepResult("", [], [], [], kind, 0, 0, 0, "error", True, error=message)


# -- cutting a token stream into steps ---------------------------------------------------------


@dataclasses.dataclass
class Token:
    """One generated token as a stream delivers it."""

    text: str
    confidence: float  # raw max logit or top-1 probability (the backend's `confidence_kind`)
    logprob: float  # the sampled token's value
    top: list[float]  # the top values, descending
    token_id: int | None = None


class StepCutter:
    """Cuts a stream of tokens into steps where a stepwise request's stop string would: a step
    ends with the token after which the text written since the last cut holds the delimiter
    past its first non-blank character. A stretch of blank lines is therefore never a step of
    its own — it joins the next step — and a token that straddles the delimiter belongs to the
    step it ends (its characters after the delimiter start the next step's text)."""

    def __init__(self):
        self.tokens: list[Token] = []  # of the step being written
        self.text = ""  # its text so far, including characters carried over from a cut token

    def feed(self, token: Token) -> tuple[list[Token], str] | None:
        """Add a token; returns (the step's tokens, the step's text) when it completes one."""
        self.tokens.append(token)
        self.text += token.text
        start = len(self.text) - len(self.text.lstrip())
        cut = self.text.find(STEP_DELIMITER, start)
        if start == len(self.text) or cut < 0:
            return None
        done, text = self.tokens, self._text(self.text[:cut])
        self.tokens, self.text = [], self.text[cut + len(STEP_DELIMITER):]
        return done, text

    @staticmethod
    def _text(raw: str) -> str:
        """A step's text: without the blank lines before it (those a stepwise request would
        have answered as an empty step) and without surrounding newlines."""
        start = len(raw) - len(raw.lstrip())
        return raw[raw.rfind("\n", 0, start) + 1:].strip("\n")

    def rest(self) -> tuple[list[Token], str]:
        """What is left when the stream ends: the last step (maybe blank)."""
        done, text = self.tokens, self._text(self.text)
        self.tokens, self.text = [], ""
        return done, text


def step_result(tokens: Sequence[Token], text: str, kind: str, *, finish: str, eos: bool,
                prompt_tokens: int = 0, cached_tokens: int = 0, last: bool = False
                ) -> StepResult:
    """A `StepResult` of a step cut from a stream. `last`: the stream ended with it (EOS or the
    length limit); a step with \\boxed{} is final either way."""
    return StepResult(
        text=text, token_ids=[t.token_id for t in tokens if t.token_id is not None],
        tokens=[t.text for t in tokens], confidence=[t.confidence for t in tokens],
        confidence_kind=kind, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
        completion_tokens=len(tokens), finish_reason=finish if last else "stop",
        is_final=is_final_step(text, finish if last else "stop", eos and last) or last,
        logprobs=[t.logprob for t in tokens], top_logprobs=[list(t.top) for t in tokens])


# -- the stream interface ----------------------------------------------------------------------


class AnswerStream(Protocol):
    """A model's answer from one prefix, step by step."""

    async def next(self) -> StepResult | None:
        """The next completed step, or None when the answer has ended."""
        ...

    async def close(self) -> StepResult | None:
        """End the stream (cancelling generation upstream); the tokens produced beyond the last
        step handed over, as a piece to pay for (None when there are none)."""
        ...


@dataclasses.dataclass
class Answer:
    """What an answer stream needs: the request (prefix, key, the stream's seed), the seed of
    each empty-step retry, and the guards."""

    request: StepRequest
    retry_seeds: tuple[int, ...] = ()
    max_tokens: int = 4096  # guard: generated tokens of the whole answer
    max_tokens_per_step: int = 1024  # a stepwise backend's limit per step call
    whole: bool = False  # the rest in one piece, not cut into steps (a leaf)
    budget: int | None = None  # a served request's tokens left for this answer (decision 90)

    def limit(self, written: int = 0, *, stream: bool = False) -> int:
        """The token limit of the next call, after `written` tokens of this answer: the
        step's guard (or the answer's, for the rest in one piece or one streaming request —
        which has no per-step limit), within what the budget leaves."""
        limit = self.max_tokens if self.whole or stream else self.max_tokens_per_step
        if self.budget is not None:
            limit = max(1, min(limit, self.budget - written))
        return limit


class Gatherer:
    """Gathers what concurrent tasks submit within a few turns of the event loop into one call
    `fn(items) -> results`, run in a worker thread holding `IN_PROCESS`; items that arrive
    while a call runs go together into the next one. A failed call fails every item in it."""

    def __init__(self, fn: Callable[[list], list]):
        self.fn = fn
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut = loop.create_future()
        self._queue.append((item, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            for _ in range(4):  # every task about to submit joins this call
                await asyncio.sleep(0)
            self._wake.clear()
            batch = [(i, f) for i, f in self._queue if not f.cancelled()]
            self._queue = []
            if not batch:
                continue
            try:
                out = await asyncio.to_thread(in_process, self.fn, [i for i, _ in batch])
            except Exception as e:  # noqa: BLE001 — delivered to every waiting task
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(batch, out, strict=True):
                if not f.done():
                    f.set_result(r)


class StepBatcher:
    """Gathers the step requests of every concurrent answer of one backend into one `generate`
    call per (whole, limit) (`Gatherer`: continuous batching at step granularity). An HTTP
    backend's requests go out at once on the loop, through its long-lived client (its server
    batches)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._gather = Gatherer(self._generate)

    async def step(self, req: StepRequest, *, whole: bool, max_tokens: int) -> StepResult:
        if hasattr(self.backend, "agenerate"):  # an HTTP backend: the server batches
            return (await self.backend.agenerate([req], whole=whole, max_tokens=max_tokens))[0]
        return await self._gather.submit((req, whole, max_tokens))

    def _generate(self, items: list[tuple[StepRequest, bool, int]]) -> list[StepResult]:
        out: list = [None] * len(items)
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, (_, whole, limit) in enumerate(items):
            groups.setdefault((whole, limit), []).append(i)
        for (whole, limit), idx in groups.items():
            res = isolated(self.backend, [items[i][0] for i in idx], whole, limit)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out


def in_process(fn, *args):
    """`fn(*args)` holding `IN_PROCESS` (run in a worker thread)."""
    with IN_PROCESS:
        return fn(*args)


def isolated(backend: Backend, reqs: list[StepRequest], whole: bool, limit: int
             ) -> list[StepResult]:
    """`backend.generate(reqs)`, where a request the backend refuses (`ValueError`: bad input
    that a batched in-process call raises for the whole batch) fails alone — as its own
    `StepResult.error` — and never takes its batch mates down with it (decision 83)."""
    try:
        return backend.generate(reqs, whole=whole, max_tokens=limit)
    except ValueError as e:
        if len(reqs) == 1:
            return [error_result(f"request {reqs[0].key}: {e}")]
    return [r for req in reqs for r in isolated(backend, [req], whole, limit)]


class StepwiseStream:
    """An answer written one batched step call at a time (the in-process engines). Reading the
    next step means the last one was accepted: the next request continues from it (by token ids
    while the prefix is this model's own, else by text)."""

    def __init__(self, batcher: StepBatcher, answer: Answer):
        self.batcher, self.a = batcher, answer
        req = answer.request
        self.steps, self.ids = list(req.steps), (list(req.token_ids)
                                                 if req.token_ids is not None else None)
        self.tokens, self.attempt, self.ended, self.last = 0, 0, False, None

    async def next(self) -> StepResult | None:
        a, req = self.a, self.a.request
        if self.last is not None:  # the consumer read on: the last step was accepted
            r, self.last = self.last, None
            self.steps.append(r.text)
            if self.ids is not None:
                self.ids.extend(r.token_ids)
        if self.ended:
            return None
        seed = req.seed if self.attempt == 0 else a.retry_seeds[self.attempt - 1]
        step = StepRequest(f"{req.key}/{len(self.steps)}" + "/retry" * self.attempt,
                           req.question, tuple(self.steps),
                           tuple(self.ids) if self.ids is not None else None, seed)
        r = await self.batcher.step(step, whole=a.whole, max_tokens=a.limit(self.tokens))
        self.tokens += r.completion_tokens
        if is_empty(r):
            self.attempt += 1
            self.ended = self.attempt > min(EMPTY_RETRIES, len(a.retry_seeds))
            return r
        self.attempt = 0
        self.ended = r.is_final or r.error is not None or a.whole
        self.last = r
        return r

    async def close(self) -> StepResult | None:
        self.ended = True
        return None  # nothing is written beyond the step handed over


def open_answer(backend: Backend, batcher: StepBatcher | None, answer: Answer) -> AnswerStream:
    """The answer stream of `backend`: one streaming request if it streams, else stepwise. The
    rest in one piece (`whole`, a leaf) is one plain request either way — the very request
    trace generation's leaves make."""
    if is_streaming(backend) and not answer.whole:
        return backend.astream(answer)
    if batcher is None:
        raise ValueError(f"{backend.name}: a stepwise answer needs its StepBatcher")
    return StepwiseStream(batcher, answer)


def is_streaming(backend: Backend) -> bool:
    """Whether `backend` writes an answer as one streaming request (`astream`)."""
    return bool(getattr(backend, "streaming", False)) and hasattr(backend, "astream")


async def read_all(stream: AnswerStream, max_steps: int, max_tokens: int
                   ) -> tuple[list[StepResult], str]:
    """Every step of an answer to its end (trace generation's segments), under the guards:
    (steps, status). Empty steps are returned too (they are paid for); tokens a streaming
    upstream wrote past the final step before the cancel reached it are not (a tree prices the
    answer as if the cancel were instant; the live engine pays them, decision 94)."""
    out, status, kept, tokens = [], "ok", 0, 0
    try:
        while (r := await stream.next()) is not None:
            out.append(r)
            tokens += r.completion_tokens
            if r.error is not None:
                return out, f"error: {r.error}"
            if is_empty(r):
                continue
            kept += 1
            if r.is_final:
                break
            if kept >= max_steps:
                status = "max_steps"
                break
            if tokens >= max_tokens:
                status = "max_tokens"
                break
        else:
            if out and is_empty(out[-1]):
                status = "empty_step"
    finally:
        await stream.close()
    return out, status


async def close_clients(backends: Sequence[Backend]) -> None:
    """Close the long-lived clients the running loop's answers opened (a loop of one run)."""
    for b in backends:
        if hasattr(b, "aclose"):
            await b.aclose()
