"""The tiny LMs behind the generation layer's `Backend` interface.

Batched sampling with a KV cache (one jitted `lax.while_loop` per call), temperature, stop on
"\\n\\n" (the delimiter's tokens stay in `token_ids`, as with vLLM), true pre-softmax logits per
token (`confidence_kind="max_logit"`, so S_os is the real thing), FLOPs from the real parameter
count (2N per generated token).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from generation.backend import StepRequest, StepResult, is_final_step, prefix_text
from generation.tinylm import train
from generation.tinylm.model import LMConfig, TinyLM, Tokenizer

WEIGHTS = Path(__file__).resolve().parent / "weights"
TOPK = 5


class TinyLMBackend:
    def __init__(self, name: str, cfg: LMConfig, weights, *, temperature: float = 0.7):
        self.name, self.cfg, self.weights = name, cfg, weights
        self.model = TinyLM(cfg)
        self.tok = Tokenizer()
        self.temperature = temperature
        # N for FLOPs: the real parameter count of these weights.
        self.params = float(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(weights)))
        self._loop = jax.jit(self._sample, static_argnames=("max_new", "whole"))

    def _sample(self, weights, prompts, lengths, keys, *, max_new: int, whole: bool):
        b = prompts.shape[0]
        nl, eos = self.tok.stoi["\n"], self.tok.eos
        last_logits, caches = self.model.apply(weights, prompts, lengths,
                                               method=TinyLM.prefill)
        out_tok = jnp.zeros((b, max_new), jnp.int32)
        out_z = jnp.zeros((b, max_new), jnp.float32)
        out_lp = jnp.zeros((b, max_new, 2), jnp.float32)  # sampled token: (log-prob, raw logit)
        out_top = jnp.zeros((b, max_new, TOPK), jnp.int32)
        out_toplp = jnp.zeros((b, max_new, TOPK, 2), jnp.float32)  # top-k: (log-prob, raw logit)

        def cond(c):
            i, _, _, _, done, *_ = c
            return (i < max_new) & ~jnp.all(done)

        def body(c):
            i, logits, caches, pos, done, n, prev, outs, keys = c
            out_tok, out_z, out_lp, out_top, out_toplp = outs
            keys, sub = jax.vmap(jax.random.split, out_axes=1)(keys)
            t = jax.vmap(jax.random.categorical)(sub, logits / self.temperature).astype(jnp.int32)
            zmax = jnp.max(logits, axis=-1)
            live = ~done
            logp = jax.nn.log_softmax(logits, -1)
            top_lp, top_i = jax.lax.top_k(logp, TOPK)
            both = jnp.stack([logp, logits], -1)  # [B, V, 2]
            out_tok = out_tok.at[:, i].set(jnp.where(live, t, 0))
            out_z = out_z.at[:, i].set(jnp.where(live, zmax, 0.0))
            out_lp = out_lp.at[:, i].set(jnp.take_along_axis(both, t[:, None, None], 1)[:, 0])
            out_top = out_top.at[:, i].set(top_i)
            out_toplp = out_toplp.at[:, i].set(jnp.take_along_axis(both, top_i[..., None], 1))
            n = n + live
            stop = (t == eos) | ((t == nl) & (prev == nl) & (not whole))
            stop = stop | (pos + 1 >= self.cfg.max_len - 1)
            new_done = done | (live & stop)
            logits, caches = self.model.apply(weights, jnp.where(live, t, 0), caches, pos,
                                              method=TinyLM.decode)
            pos = jnp.where(live, pos + 1, pos)
            outs = (out_tok, out_z, out_lp, out_top, out_toplp)
            return (i + 1, logits, caches, pos, new_done, n, jnp.where(live, t, prev), outs, keys)

        init = (0, last_logits, caches, lengths, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32),
                jnp.full(b, -1, jnp.int32), (out_tok, out_z, out_lp, out_top, out_toplp), keys)
        _, _, _, _, done, n, _, outs, _ = jax.lax.while_loop(cond, body, init)
        return outs, n, done

    def generate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                 max_tokens: int = 256) -> list[StepResult]:
        if not requests:
            return []
        prompts = []
        for r in requests:
            ids = self.tok.prompt(r.question)
            if r.token_ids is not None:
                ids = ids + list(r.token_ids)
            elif r.steps:
                ids = ids + self.tok.encode(prefix_text(r.steps))
            prompts.append(ids)
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.max() >= self.cfg.max_len - 1:
            raise ValueError(f"prompt of {lengths.max()} tokens exceeds the tiny model's "
                             f"context ({self.cfg.max_len})")
        # Bucket shapes so the jitted loop compiles a handful of times, not once per call.
        width = int(-(-lengths.max() // 32) * 32)
        rows = int(-(-len(prompts) // 8) * 8)
        arr = np.zeros((rows, width), np.int32)
        for i, p in enumerate(prompts):
            arr[i, :len(p)] = p
        lens = np.ones(rows, np.int32)
        lens[:len(prompts)] = lengths
        keys = jnp.stack([jax.random.PRNGKey(r.seed) for r in requests]
                         + [jax.random.PRNGKey(0)] * (rows - len(requests)))
        max_new = int(min(max_tokens, self.cfg.max_len - 1 - lengths.max()))
        max_new = max(8, int(-(-max_new // 32) * 32))
        (toks, zs, lps, tops, toplps), n, done = jax.device_get(self._loop(
            self.weights, jnp.asarray(arr), jnp.asarray(lens), keys, max_new=max_new,
            whole=whole))
        # Per-token log-probs / raw logits of the last call, for the HTTP server's logprobs
        # fields (the server serialises calls under a lock).
        self.last_logprobs = [(lps[i, :n[i]], tops[i, :n[i]], toplps[i, :n[i]])
                              for i in range(len(requests))]
        out = []
        for i in range(len(requests)):
            ids = [int(t) for t in toks[i, :n[i]]]
            eos = bool(ids) and ids[-1] == self.tok.eos
            text = self.tok.decode(ids)
            finish = "stop" if done[i] and len(ids) <= max_new and (eos or text.endswith("\n\n")
                                                                    or whole) else "length"
            text = text.rstrip("\n") if not whole else text.strip("\n")
            step_text = text.split("\n\n")[0] if not whole else text
            out.append(StepResult(
                text=step_text, token_ids=ids,
                tokens=[self.tok.itos[t] if t >= 4 else "" for t in ids],
                confidence=[float(z) for z in zs[i, :n[i]]], confidence_kind="max_logit",
                prompt_tokens=int(lengths[i]), cached_tokens=0, completion_tokens=len(ids),
                finish_reason=finish,
                is_final=whole or is_final_step(step_text, finish, eos)))
        return out


@functools.lru_cache(maxsize=4)
def load(which: str, path: str | None = None, temperature: float = 0.7) -> TinyLMBackend:
    """The committed tiny model "small" or "large" (checksum-verified)."""
    cfg, weights, _ = train.load(Path(path) if path else WEIGHTS, which)
    return TinyLMBackend(f"tinylm-{which}", cfg, weights, temperature=temperature)
