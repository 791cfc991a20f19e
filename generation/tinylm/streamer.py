"""Answer streams of the tiny models: one continuous-batching decode loop per model that hands
each finished step to its answer's consumer (decision 97).

Every answer being written is a row of one decode state (`backend.DecodeState`, K/V as long as
the context). The jitted loop (`TinyLMBackend._decode`, the one `generate` runs) writes every
running row until it ends a step — its row pauses there — or the answer ends; it returns to the
host once at most a quarter of the rows still run. The host hands each finished step to its
stream and waits (briefly) for the consumers' decisions: a stream read on resumes its row where
it paused — no re-prefill, no prefix-cache copy, the same K/V — and a closed one frees its row
for the next answer to join. Each token is drawn with the key of (the request's seed, its
position), so a stream writes the tokens `generate` writes step by step (decision 87): the
trees, made step by step, replay live. An empty step is asked again with a fresh seed, as a
stepwise request is (decision 75): that stream finishes step by step (`StepwiseStream`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from generation.backends import streams
from generation.backends.base import StepResult, prefix_text
from generation.tinylm.decode import (
    DecodeState,
    _bucket,
    _empty_batch,
    _keys,
    _padded,
    _place,
    _rows,
    _take,
)

SETTLE_S = 0.05  # the longest the loop waits for decisions on the steps it handed over


class TinyStream:
    """One answer (`streams.AnswerStream`) written by a `Streamer` row."""

    def __init__(self, streamer: Streamer, answer: streams.Answer):
        self.s, self.a = streamer, answer
        req, tok = answer.request, streamer.be.tok
        tail = list(req.token_ids) if req.token_ids is not None else (
            tok.encode(prefix_text(req.steps)) if req.steps else [])
        self.prompt = tok.prompt(req.question) + tail
        self.steps, self.ids = list(req.steps), (list(req.token_ids)
                                                 if req.token_ids is not None else None)
        self.row: int | None = None
        self.parts: list[tuple] = []  # per-token outputs of the step being written
        self.written = 0  # tokens of this answer's accepted steps
        self.ready: asyncio.Queue = asyncio.Queue()
        self.started = self.ended = False
        self.pending: StepResult | None = None  # handed over, not yet read on or closed
        self.fallback: streams.StepwiseStream | None = None

    async def next(self) -> StepResult | None:
        if self.fallback is not None:
            return await self.fallback.next()
        if self.pending is not None:  # read on: the step is accepted
            r, self.pending = self.pending, None
            self.steps.append(r.text)
            if self.ids is not None:
                self.ids.extend(r.token_ids)
            self.written += r.completion_tokens
            if r.is_final or self.ended:
                self.ended = True
                return None
            self.s.resume(self)
        elif not self.started:
            self.started = True
            self.s.admit(self)
        elif self.ended:
            return None
        r = await self.ready.get()
        if streams.is_empty(r):  # asked again with a fresh seed, step by step from here on
            self.s.release(self)
            self.fallback = streams.StepwiseStream(self.s.batcher, self._rest_answer())
            self.fallback.attempt = 1
            return r
        self.pending = r
        if r.is_final or r.error is not None:
            self.ended = True
            self.s.release(self)
        return r

    def _rest_answer(self) -> streams.Answer:
        req = self.a.request
        ids = tuple(self.ids) if self.ids is not None else None
        req = type(req)(req.key, req.question, tuple(self.steps), ids, req.seed)
        return streams.Answer(req, self.a.retry_seeds, self.a.max_tokens,
                              self.a.max_tokens_per_step, budget=None if self.a.budget is None
                              else max(1, self.a.budget - self.written))

    async def close(self) -> StepResult | None:
        """Free the row; a step cut mid-way (a cancelled task) is paid as written."""
        if self.fallback is not None:
            return await self.fallback.close()
        self.ended, self.pending = True, None
        partial = sum(len(p[0]) for p in self.parts)
        self.s.release(self)
        if not partial:
            return None
        return StepResult("", [], [], [], "max_logit", 0, 0, partial, "stop", False)


class Streamer:
    """The decode loop of one backend on one event loop (`TinyLMBackend.astream`)."""

    def __init__(self, backend: Any):  # a `backend.TinyLMBackend` (which imports this module)
        self.be, self.length = backend, backend.cfg.max_len
        self.batcher = streams.StepBatcher(backend)  # for streams that went step by step
        self.slots: list[TinyStream | None] = []
        self.logits = self.caches = None  # device state of the slots
        n = 0
        self.pos, self.prev, self.budget = (np.zeros(n, np.int32) for _ in range(3))
        self.seeds, self.done = np.zeros(n, np.uint32), np.ones(n, bool)
        self.admits: list[TinyStream] = []
        self.wake = asyncio.Event()
        self.settled = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.calls = 0

    # -- what streams ask ----------------------------------------------------------------------

    def _kick(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        self.wake.set()
        if not self._unresolved():
            self.settled.set()

    def admit(self, st: TinyStream) -> None:
        self.admits.append(st)
        self._kick()

    def resume(self, st: TinyStream) -> None:
        j = st.row
        self.done[j], self.prev[j] = False, -1
        self.budget[j] = self._limit(st, self.pos[j])
        self._kick()

    def release(self, st: TinyStream) -> None:
        if st.row is not None and self.slots[st.row] is st:
            self.slots[st.row] = None
            self.done[st.row] = True
        st.row = None
        self._kick()

    def _limit(self, st: TinyStream, pos: int) -> int:
        return max(1, min(st.a.limit(st.written), self.length - 1 - int(pos)))

    def _unresolved(self) -> bool:
        return any(s is not None and s.pending is not None for s in self.slots)

    def _running(self) -> int:
        return sum(1 for j, s in enumerate(self.slots) if s is not None and not self.done[j])

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception as e:  # noqa: BLE001 — every waiting answer fails with it, loudly
            waiting = [st for st in self.slots if st is not None] + self.admits
            self.slots, self.admits, self.logits, self.caches = [], [], None, None
            self.pos, self.prev, self.budget = (np.zeros(0, np.int32) for _ in range(3))
            self.seeds, self.done = np.zeros(0, np.uint32), np.ones(0, bool)
            for st in waiting:
                st.row, st.ended = None, True
                st.ready.put_nowait(streams.error_result(
                    f"request {st.a.request.key}: the decode loop failed: "
                    f"{type(e).__name__}: {e}"))

    async def _serve(self) -> None:
        while True:
            if not self.admits and not self._running():
                self.wake.clear()
                await self.wake.wait()
            live = sum(s is not None for s in self.slots)
            if self._unresolved() and self._running() <= live // 4:
                self.settled.clear()  # the handed-over steps' decisions, together
                try:
                    await asyncio.wait_for(self.settled.wait(), SETTLE_S)
                except TimeoutError:
                    pass
            if self.admits:
                admits, self.admits = self.admits, []
                self._admit(admits)
            if not self._running():
                continue
            self.calls += 1
            out = await asyncio.to_thread(streams.in_process, self._decode)
            if out is not None:
                self._deliver(*out)

    def _admit(self, admits: list[TinyStream]) -> None:
        ok = []
        for st in admits:
            if len(st.prompt) >= self.length - 1:
                st.ended = True
                st.ready.put_nowait(streams.error_result(
                    f"request {st.a.request.key}: a prompt of {len(st.prompt)} tokens leaves no "
                    f"room in the tiny model's context ({self.length})"))
            else:
                ok.append(st)
        if not ok:
            return
        free = [j for j, s in enumerate(self.slots) if s is None]
        if len(free) < len(ok):
            self._resize(_rows(sum(s is not None for s in self.slots) + len(ok)))
            free = [j for j, s in enumerate(self.slots) if s is None]
        n = _rows(len(ok))
        with streams.IN_PROCESS:
            logits, caches = self.be._prefill_rows([st.prompt for st in ok], n, self.length)
        dst = np.full(n, len(self.slots), np.int32)
        for i, (st, j) in enumerate(zip(ok, free, strict=False)):
            dst[i], st.row, self.slots[j] = j, j, st
            self.pos[j], self.prev[j], self.done[j] = len(st.prompt), -1, False
            self.seeds[j] = st.a.request.seed % 2**32
            self.budget[j] = self._limit(st, len(st.prompt))
        self.logits, self.caches = _place((self.logits, self.caches), (logits, caches),
                                          jnp.asarray(dst))

    def _resize(self, rows: int) -> None:
        """Move the live slots into a state of `rows` rows (grow, or compact)."""
        keep = [j for j, s in enumerate(self.slots) if s is not None]
        if self.logits is None:
            like = self.be._prefill_rows([[self.be.tok.bos]], 8, self.length)
            self.logits, self.caches = _empty_batch(*like, rows=rows, length=self.length)
        else:
            src = (self.logits, self.caches)
            if keep:
                src = _take(src, jnp.asarray(_padded(keep, _rows(len(keep)))))
            batch = _empty_batch(*src, rows=rows, length=self.length)
            dst = np.full(src[0].shape[0], rows, np.int32)
            dst[:len(keep)] = np.arange(len(keep))
            self.logits, self.caches = _place(batch, src, jnp.asarray(dst))
        slots = [self.slots[j] for j in keep] + [None] * (rows - len(keep))
        for i, st in enumerate(slots):
            if st is not None:
                st.row = i

        def moved(a, fill):
            out = np.full(rows, fill, a.dtype)
            out[:len(keep)] = a[keep]
            return out

        self.pos, self.prev, self.budget = (moved(self.pos, 1), moved(self.prev, -1),
                                            moved(self.budget, 1))
        self.seeds, self.done = moved(self.seeds, 0), moved(self.done, True)
        self.slots = slots

    def _decode(self):
        """One run of the jitted loop over every slot (a worker thread)."""
        be, rows = self.be, len(self.slots)
        # Copies: on the CPU a device array may alias the host buffer it was made from, and
        # the event loop resumes and frees rows (writes these mirrors) while the loop runs.
        pos, prev, budget, seeds, done = (a.copy() for a in (self.pos, self.prev, self.budget,
                                                              self.seeds, self.done))
        running = [j for j in range(rows) if not done[j]]
        if not running:  # freed since the loop looked
            return None
        max_new = _bucket(min(int(budget[running].max()), self.length), 32)
        state = DecodeState(self.logits, tuple(self.caches), *jax.device_put(
            (pos, prev, budget)), _keys(jnp.asarray(seeds)), jax.device_put(done))
        outs, n, state = be._loop(be.weights, state, max_new=max_new, whole=False,
                                  min_live=rows // 4 if rows >= 32 else 0)
        got = jax.device_get((outs, n, state.done, state.pos, state.prev, state.budget))
        self.logits, self.caches = state.logits, state.caches
        return (*got, running)

    def _deliver(self, outs, n, done, pos, prev, budget, running) -> None:
        # only the rows this call ran: a paused row may have been resumed meanwhile
        self.pos[running], self.prev[running] = pos[running], prev[running]
        self.budget[running] = budget[running]
        for j in running:
            st = self.slots[j]
            if st is None:  # closed while the loop ran
                continue
            if n[j]:
                st.parts.append(tuple(o[j, :n[j]] for o in outs))
            if not done[j]:
                continue
            self.done[j] = True
            cat = [np.concatenate([p[m] for p in st.parts]) for m in range(6)]
            st.parts = []
            prompt = len(st.prompt) + st.written
            st.ready.put_nowait(self.be.result(cat, prompt, prompt if st.written else 0, False))
        live = sum(s is not None for s in self.slots)
        if len(self.slots) > 8 and live <= len(self.slots) // 4:
            self._resize(_rows(live))
