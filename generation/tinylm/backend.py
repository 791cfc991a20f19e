"""The tiny LMs behind the generation layer's `Backend` interface.

Batched sampling with a KV cache, temperature (each token drawn with a key folded from the
request's seed and the token's absolute position, decision 87), stop on "\\n\\n" (the
delimiter's tokens stay in `token_ids`, as with vLLM), true pre-softmax logits per token
(`confidence_kind="max_logit"`, so S_os is the real thing), FLOPs from the real parameter
count (2N per generated token).

Three things keep stepwise generation close to one-shot generation in wall time:

- **Prefix cache** (vLLM's automatic prefix caching, in small): when a row finishes, its decode
  state (K/V up to its last token and the next-token logits) is kept under its full token
  sequence. A later request whose prompt + `token_ids` is exactly such a sequence — the next step
  of the same model — starts from that state instead of re-prefilling (`cached_tokens` = the
  prompt length, as vLLM reports it). The state never leaves the device: the rows that finish
  in one decode round are gathered into a held state of their own (not a view that would keep
  the whole batch's buffers alive), and a later call scatters its rows from the held states into
  its batch on the device (one in-place scatter per source). LRU over sequences, bounded in
  bytes of held states (`prefix_cache_mb`; decision 81).
- **Cache length per call**: K/V caches are as long as the call's rows can reach (a multiple
  of 64 positions), not the whole context, so short steps pay less attention and fewer bytes.
- **Compaction** (continuous batching, in small): the jitted decode loop returns to the host when
  at most a quarter of its rows are still live; the stragglers continue in a smaller batch, so
  a call does not pay full-batch decode steps for its few longest rows.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from generation.backends.base import StepRequest, StepResult, is_final_step, prefix_text
from generation.tinylm import train
from generation.tinylm.decode import (
    DecodeState,
    _bucket,
    _cache_len,
    _empty_batch,
    _keys,
    _nbytes,
    _padded,
    _place,
    _rows,
    _take,
)
from generation.tinylm.model import LMConfig, TinyLM, Tokenizer
from jaxroute.errors import InputError

WEIGHTS = Path(__file__).resolve().parent / "weights"
TOPK = 5


class TinyLMBackend:
    def __init__(self, name: str, cfg: LMConfig, weights, *, temperature: float = 0.7,
                 prefix_cache_mb: float = 64.0):
        self.name, self.cfg, self.weights = name, cfg, weights
        self.model = TinyLM(cfg)
        self.tok = Tokenizer()
        self.temperature = temperature
        # N for FLOPs: the real parameter count of these weights.
        self.params = float(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(weights)))
        self._prefill = jax.jit(
            lambda w, tokens, lengths, cache_len: self.model.apply(
                w, tokens, lengths, cache_len, method=TinyLM.prefill),
            static_argnames=("cache_len",))
        self._loop = jax.jit(self._decode, static_argnames=("max_new", "whole", "min_live"))
        # Prefix cache: token sequence -> (held id, row). A held state is the decode state of
        # the rows that finished in one decode round (on the device, never copied to the host);
        # it is kept while any of its rows is cached, and counted in bytes once.
        self._cache: collections.OrderedDict[tuple[int, ...], tuple[int, int]] = (
            collections.OrderedDict())
        self._held: dict[int, list] = {}  # held id -> [(logits, caches), rows cached, bytes]
        self._held_ids = itertools.count()
        self.prefix_cache_bytes = int(prefix_cache_mb * 2**20)
        self._cache_bytes = 0
        self.version: str | None = None
        self.stats = collections.Counter()  # prefix-cache hits/misses, decode-loop launches
        self._streamer = None  # (event loop, Streamer) of the last loop that streamed

    # Answers are written as rows of one continuous decode loop (`streamer`, decision 97).
    streaming = True

    def astream(self, answer):
        """An answer stream (`generation.backends.streams.AnswerStream`) written by this event
        loop's `streamer.Streamer`."""
        from generation.tinylm.streamer import Streamer, TinyStream  # it imports this module

        loop = asyncio.get_running_loop()
        if self._streamer is None or self._streamer[0] is not loop:
            self._streamer = (loop, Streamer(self))
        return TinyStream(self._streamer[1], answer)

    def clear_prefix_cache(self) -> None:
        self._cache.clear()
        self._held.clear()
        self._cache_bytes = 0

    # -- the jitted decode loop ------------------------------------------------------------------

    def _decode(self, weights, s: DecodeState, *, max_new: int, whole: bool, min_live: int):
        """Sample until every row is done, `max_new` tokens, or ≤ `min_live` rows are live.

        Returns the per-token outputs `[R, max_new, …]`, tokens generated per row `[R]`, and the
        state to resume from.
        """
        b = s.pos.shape[0]
        nl, eos = self.tok.stoi["\n"], self.tok.eos
        outs = (jnp.zeros((b, max_new), jnp.int32),  # sampled token
                jnp.zeros((b, max_new), jnp.float32),  # max raw logit (S_os)
                jnp.zeros((b, max_new, 2), jnp.float32),  # sampled token: (log-prob, raw logit)
                jnp.zeros((b, max_new, TOPK), jnp.int32),  # top-k token ids
                jnp.zeros((b, max_new, TOPK, 2), jnp.float32),  # top-k: (log-prob, raw logit)
                jnp.zeros((b, max_new), jnp.float32))  # entropy of the next-token distribution

        # A live row writes position pos + i at iteration i, so every key the call can use is
        # folded up front, in one vectorised op outside the loop (in the loop body the fold
        # costs a tenth of a tiny model's step).
        pos_keys = jax.vmap(lambda k, p: jax.vmap(lambda j: jax.random.fold_in(k, p + j))(
            jnp.arange(max_new)))(s.keys, s.pos)  # [R, max_new, 2]

        def cond(c):
            i, s, _, _ = c
            n_live = jnp.sum(~s.done)
            return (i < max_new) & (n_live > 0) & ((i == 0) | (n_live > min_live))

        def body(c):
            i, s, n, outs = c
            out_tok, out_z, out_lp, out_top, out_toplp, out_ent = outs
            # The token's randomness is (row seed, absolute position): the same prefix gets the
            # same token whether the call writes one step or the rest (decision 87).
            sub = jax.lax.dynamic_index_in_dim(pos_keys, i, axis=1, keepdims=False)
            logits = s.logits
            if self.temperature == 0:  # greedy (a real engine's temperature 0)
                t = jnp.argmax(logits, -1).astype(jnp.int32)
            else:
                t = jax.vmap(jax.random.categorical)(sub, logits / self.temperature).astype(
                    jnp.int32)
            live = ~s.done
            logp = jax.nn.log_softmax(logits, -1)
            top_lp, top_i = jax.lax.top_k(logp, TOPK)
            both = jnp.stack([logp, logits], -1)  # [R, V, 2]
            out_tok = out_tok.at[:, i].set(jnp.where(live, t, 0))
            out_z = out_z.at[:, i].set(jnp.where(live, jnp.max(logits, -1), 0.0))
            out_lp = out_lp.at[:, i].set(jnp.take_along_axis(both, t[:, None, None], 1)[:, 0])
            out_top = out_top.at[:, i].set(top_i)
            out_toplp = out_toplp.at[:, i].set(jnp.take_along_axis(both, top_i[..., None], 1))
            out_ent = out_ent.at[:, i].set(-jnp.sum(jnp.exp(logp) * logp, -1))
            n = n + live
            stop = (t == eos) | ((t == nl) & (s.prev == nl) & (not whole))
            stop = stop | (s.pos + 1 >= self.cfg.max_len - 1) | (s.budget <= 1)
            # The stopping token is still fed, so a finished row's cache holds its whole text.
            logits, caches = self.model.apply(weights, jnp.where(live, t, 0), s.caches, s.pos,
                                              method=TinyLM.decode)
            s = DecodeState(jnp.where(live[:, None], logits, s.logits),
                            tuple(caches),  # a done row rewrites its own frozen pos: harmless
                            jnp.where(live, s.pos + 1, s.pos), jnp.where(live, t, s.prev),
                            s.budget - live, s.keys, s.done | (live & stop))
            return i + 1, s, n, (out_tok, out_z, out_lp, out_top, out_toplp, out_ent)

        _, s, n, outs = jax.lax.while_loop(cond, body, (0, s, jnp.zeros(b, jnp.int32), outs))
        return outs, n, s

    # -- host side -------------------------------------------------------------------------------

    def _prompt_ids(self, r: StepRequest) -> list[int]:
        ids = self.tok.prompt(r.question)
        if r.token_ids is not None:
            return ids + list(r.token_ids)
        if r.steps:
            return ids + self.tok.encode(prefix_text(r.steps))
        return ids

    def _initial_state(self, prompts, rows: int, max_tokens: int, keys
                       ) -> tuple[DecodeState, list]:
        """State for `rows` rows (the first len(prompts) real) from the prefix cache or prefill."""
        hit = [self._cache.get(tuple(p)) for p in prompts]
        miss = [i for i, h in enumerate(hit) if h is None]
        self.stats.update(prefix_hits=len(prompts) - len(miss), prefix_misses=len(miss))
        # Each row's own budget: a short prompt is not cut short by a long one in the batch.
        budget = np.ones(rows, np.int32)
        budget[:len(prompts)] = [max(1, min(max_tokens, self.cfg.max_len - 1 - len(p)))
                                 for p in prompts]
        big = _cache_len(max(len(p) for p in prompts) + int(budget.max()), self.cfg.max_len)
        # Sources of the rows: held states (their cached rows) and one prefill of the misses.
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(hit):
            if h is not None:
                self._cache.move_to_end(tuple(prompts[i]))
                groups.setdefault(h[0], []).append(i)
        sources = [(self._held[hid][0], [hit[i][1] for i in idx], idx)
                   for hid, idx in groups.items()]
        if miss:
            n = _rows(len(miss))
            sources.append((self._prefill_rows([prompts[i] for i in miss], n, big),
                            list(range(len(miss))), miss))
        if len(sources) == 1 and miss and _rows(len(miss)) == rows:
            logits, caches = sources[0][0]  # all misses: the prefill is the state
        else:
            batch = _empty_batch(*sources[0][0], rows=rows, length=big)
            for tree, src, idx in sources:
                # One scatter per source; a row wanted twice (the same prefix twice in a call)
                # takes a second pass, since a scatter writes each source row once.
                todo = list(zip(src, idx, strict=True))
                while todo:
                    dst = np.full(tree[0].shape[0], rows, np.int32)  # out of range: dropped
                    again = []
                    for j, i in todo:
                        if dst[j] == rows:
                            dst[j] = i
                        else:
                            again.append((j, i))
                    batch = _place(batch, tree, jnp.asarray(dst))
                    todo = again
            logits, caches = batch
        pos = np.ones(rows, np.int32)
        pos[:len(prompts)] = [len(p) for p in prompts]
        done = np.arange(rows) >= len(prompts)
        pos, budget, done = jax.device_put((pos, budget, done))
        state = DecodeState(logits, tuple(caches), pos, jnp.full(rows, -1, jnp.int32), budget,
                            keys, done)
        return state, [h is not None for h in hit]

    def _prefill_rows(self, prompts, rows: int, cache_len: int):
        width = min(_bucket(max(len(p) for p in prompts), 32), cache_len)
        arr = np.zeros((rows, width), np.int32)
        for i, p in enumerate(prompts):
            arr[i, :len(p)] = p
        lens = np.ones(rows, np.int32)
        lens[:len(prompts)] = [len(p) for p in prompts]
        logits, caches = self._prefill(self.weights, jnp.asarray(arr), jnp.asarray(lens),
                                       cache_len=cache_len)
        return logits, tuple(caches)

    def _hold(self, state: DecodeState, rows: list[int], seqs: list[tuple[int, ...]]) -> None:
        """Cache finished rows `rows` of `state` under their token sequences `seqs` (LRU,
        bounded in bytes; decision 81). Their decode state stays on the device: a copy of just
        the rows whose sequence is new, so it does not keep the whole batch's buffers alive."""
        fresh: dict[tuple[int, ...], int] = {}  # sequence -> its first row, if not cached yet
        for j, seq in zip(rows, seqs, strict=True):
            if seq not in self._cache:
                fresh.setdefault(seq, j)
        if not fresh:
            return
        keep = list(fresh.values())
        tree = _take((state.logits, state.caches), jnp.asarray(_padded(keep, _rows(len(keep)))))
        hid = next(self._held_ids)
        self._held[hid] = [tree, len(fresh), _nbytes(tree)]
        self._cache_bytes += self._held[hid][2]
        for a, seq in enumerate(fresh):
            self._cache[seq] = (hid, a)
        while self._cache_bytes > self.prefix_cache_bytes and self._cache:
            hid, _ = self._cache.popitem(last=False)[1]
            self._held[hid][1] -= 1
            if self._held[hid][1] == 0:
                self._drop(hid)

    def _drop(self, hid: int) -> None:
        self._cache_bytes -= self._held.pop(hid)[2]

    def check_prompt(self, question: str) -> None:
        """Refuse (`ValueError`) a question this model cannot start from: a character outside
        its alphabet, or a prompt that leaves no room in its context (decision 83)."""
        n = len(self.tok.prompt(question))
        if n >= self.cfg.max_len - 1:
            raise InputError(f"a prompt of {n} tokens leaves no room in the tiny model's context "
                             f"({self.cfg.max_len})")

    def generate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                 max_tokens: int = 256) -> list[StepResult]:
        if not requests:
            return []
        prompts = [self._prompt_ids(r) for r in requests]
        longest = max(len(p) for p in prompts)
        if longest >= self.cfg.max_len - 1:
            raise InputError(f"prompt of {longest} tokens exceeds the tiny model's "
                             f"context ({self.cfg.max_len})")
        if max_tokens < 1:
            raise InputError(f"max_tokens must be ≥ 1, got {max_tokens}")
        # Output buffer, sized after the clamp to the context (a request for 1e9 tokens must not
        # allocate for them); per-row budgets are the real limit.
        max_new = _bucket(min(max_tokens, self.cfg.max_len), 32)
        seeds = np.zeros(_rows(len(requests)), np.uint32)
        seeds[:len(requests)] = [r.seed % 2**32 for r in requests]
        keys = _keys(jnp.asarray(seeds))
        state, hits = self._initial_state(prompts, _rows(len(requests)), max_tokens, keys)
        rows = np.arange(len(requests))  # request index of each state row (-1: padding)
        rows = np.concatenate([rows, np.full(keys.shape[0] - len(rows), -1)])
        gen = [[] for _ in requests]  # per request: list of per-token output tuples
        finished = np.zeros(len(requests), bool)
        while True:
            r_count = state.pos.shape[0]
            min_live = r_count // 4 if r_count >= 32 else 0
            self.stats.update(decode_loops=1)
            outs, n, state = self._loop(self.weights, state, max_new=max_new, whole=whole,
                                        min_live=min_live)
            outs, n, done = jax.device_get((outs, n, state.done))
            for j, i in enumerate(rows):
                if i >= 0 and n[j]:
                    gen[i].append(tuple(o[j, :n[j]] for o in outs))
            newly = [j for j, i in enumerate(rows) if i >= 0 and done[j] and not finished[i]]
            if newly and self.prefix_cache_bytes > 0:
                self._hold(state, newly, [tuple(prompts[rows[j]]) + tuple(
                    int(t) for part in gen[rows[j]] for t in part[0]) for j in newly])
            for j in newly:
                finished[rows[j]] = True
            if finished.all():
                break
            # Stragglers continue in a smaller batch (their decode state moves along).
            keep = [j for j, i in enumerate(rows) if i >= 0 and not finished[i]]
            pad = _rows(len(keep)) - len(keep)
            state = _take(state, jnp.asarray(keep + [keep[0]] * pad))
            state = state._replace(done=state.done | (jnp.arange(len(keep) + pad) >= len(keep)))
            rows = np.concatenate([rows[keep], np.full(pad, -1)])

        out = []
        self.last_logprobs = []  # per request (log-prob/raw logit, top ids, top log-prob/logit)
        for i in range(len(requests)):
            parts = gen[i]
            cat = [np.concatenate([p[m] for p in parts]) if parts else np.zeros(0)
                   for m in range(6)]
            self.last_logprobs.append((cat[2], cat[3], cat[4]))
            out.append(self.result(cat, len(prompts[i]), len(prompts[i]) if hits[i] else 0,
                                   whole))
        return out

    def result(self, cat, prompt_tokens: int, cached_tokens: int, whole: bool) -> StepResult:
        """The `StepResult` of one generated piece from its per-token outputs `cat` (sampled
        ids, max raw logits, (log-prob, logit) pairs, top ids, top pairs, entropies)."""
        ids = [int(t) for t in cat[0]]
        eos = bool(ids) and ids[-1] == self.tok.eos
        text = self.tok.decode(ids)
        finish = "stop" if eos or (not whole and text.endswith("\n\n")) else "length"
        text = text.rstrip("\n") if not whole else text.strip("\n")
        step_text = text.split("\n\n")[0] if not whole else text
        return StepResult(
            text=step_text, token_ids=ids, tokens=[self.tok.token_text(t) for t in ids],
            confidence=[float(z) for z in cat[1]], confidence_kind="max_logit",
            prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
            completion_tokens=len(ids), finish_reason=finish,
            is_final=whole or is_final_step(step_text, finish, eos),
            logprobs=[float(x) for x in cat[2][:, 0]] if ids else [],
            top_logprobs=[[float(x) for x in row] for row in cat[4][..., 0]] if ids else [],
            entropies=[float(x) for x in cat[5]] if ids else [])


@functools.lru_cache(maxsize=4)
def load(which: str, path: str | None = None, temperature: float = 0.7) -> TinyLMBackend:
    """The committed tiny model "small" or "large" (checksum-verified)."""
    cfg, weights, meta = train.load(Path(path) if path else WEIGHTS, which)
    be = TinyLMBackend(f"tinylm-{which}", cfg, weights, temperature=temperature)
    be.version = "sha256:" + meta["sha256"][:16]  # recorded in trace manifests and routers
    return be
