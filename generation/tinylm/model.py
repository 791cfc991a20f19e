"""A tiny decoder-only transformer LM in flax, with a KV cache for batched sampling.

Character-level tokenizer (`Tokenizer`): the task's alphabet plus <pad>, <bos>, <eos>, <asst>.
Pre-LayerNorm blocks, learned positions, causal attention. `__call__` is the training forward;
`prefill` and `decode` share its parameters and keep per-layer K/V caches `[B, H, L, D_h]` (L ≤
max_len, chosen per call by the backend).
"""

from __future__ import annotations

import dataclasses
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.errors import InputError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<asst>")
ALPHABET = string.ascii_letters + string.digits + " .,?!+-*=/\\{}()\n'"


class Tokenizer:
    def __init__(self):
        self.itos = list(SPECIALS) + list(ALPHABET)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.asst = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise InputError(f"character {e.args[0]!r} is not in the tiny model's alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self.itos[i] if i >= len(SPECIALS) else "" for i in ids)

    def prompt(self, question: str) -> list[int]:
        return [self.bos] + self.encode(question) + [self.asst]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab: int
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    max_len: int = 320

    def num_params(self) -> int:
        d, v, l = self.d_model, self.vocab, self.layers
        block = 4 * d * d + 4 * d + 2 * (4 * d * d) + 4 * d + d + 4 * d  # attn, mlp, 2 layernorms
        return v * d + self.max_len * d + l * block + 2 * d + d * v + v


class Block(nn.Module):
    cfg: LMConfig

    def setup(self):
        d = self.cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(), nn.LayerNorm()
        self.qkv = nn.Dense(3 * d)
        self.proj = nn.Dense(d)
        self.up = nn.Dense(4 * d)
        self.down = nn.Dense(d)

    def _split(self, x):  # [B, L, D] -> [B, H, L, Dh]
        b, l, d = x.shape
        return x.reshape(b, l, self.cfg.heads, d // self.cfg.heads).transpose(0, 2, 1, 3)

    def _mlp(self, x):
        return x + self.down(nn.gelu(self.up(self.ln2(x))))

    def __call__(self, x, mask):
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        att = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
        att = jnp.where(mask, att, -1e30)
        y = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(att, -1), v)
        y = y.transpose(0, 2, 1, 3).reshape(x.shape)
        return self._mlp(x + self.proj(y)), (k, v)

    def step(self, x, k_cache, v_cache, pos):
        """One new token per row at positions `pos` [B]; caches [B, H, L, Dh]."""
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)  # x [B, 1, D]
        q, k, v = self._split(q), self._split(k), self._split(v)
        rows = jnp.arange(x.shape[0])
        k_cache = k_cache.at[rows, :, pos].set(k[:, :, 0])
        v_cache = v_cache.at[rows, :, pos].set(v[:, :, 0])
        att = jnp.einsum("bhqd,bhkd->bhqk", q, k_cache) / np.sqrt(q.shape[-1])
        visible = jnp.arange(k_cache.shape[2])[None, :] <= pos[:, None]  # [B, L]
        att = jnp.where(visible[:, None, None, :], att, -1e30)
        y = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(att, -1), v_cache)
        y = y.transpose(0, 2, 1, 3).reshape(x.shape)
        return self._mlp(x + self.proj(y)), k_cache, v_cache


class TinyLM(nn.Module):
    cfg: LMConfig

    def setup(self):
        self.tok = nn.Embed(self.cfg.vocab, self.cfg.d_model)
        self.pos = nn.Embed(self.cfg.max_len, self.cfg.d_model)
        self.blocks = [Block(self.cfg) for _ in range(self.cfg.layers)]
        self.ln = nn.LayerNorm()
        self.head = nn.Dense(self.cfg.vocab)

    def hidden(self, tokens):
        """Final (layer-normed) hidden states `[B, L, D]`: the backbone a reward head reads."""
        l = tokens.shape[1]
        x = self.tok(tokens) + self.pos(jnp.arange(l))[None]
        mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
        for blk in self.blocks:
            x, _ = blk(x, mask)
        return self.ln(x)

    def __call__(self, tokens):
        """Training forward: logits `[B, L, V]` (raw, pre-softmax)."""
        return self.head(self.hidden(tokens))

    def prefill(self, tokens, lengths, cache_len: int | None = None):
        """Logits at each row's last prompt token `[B, V]` and K/V caches `[B, H, cache_len, Dh]`
        (zero beyond the prompt; `cache_len` ≥ the prompt width, max_len by default)."""
        b, l = tokens.shape
        cache_len = self.cfg.max_len if cache_len is None else cache_len
        x = self.tok(tokens) + self.pos(jnp.arange(l))[None]
        mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
        caches = []
        for blk in self.blocks:
            x, (k, v) = blk(x, mask)
            pad = ((0, 0), (0, 0), (0, cache_len - l), (0, 0))
            caches.append((jnp.pad(k, pad), jnp.pad(v, pad)))
        logits = self.head(self.ln(x))
        return logits[jnp.arange(b), lengths - 1], caches

    def decode(self, token, caches, pos):
        """Feed one token per row at position `pos` [B]; returns logits [B, V] and caches."""
        x = self.tok(token[:, None]) + self.pos(pos)[:, None]
        new = []
        for blk, (k, v) in zip(self.blocks, caches, strict=True):
            x, k, v = blk.step(x, k, v, pos)
            new.append((k, v))
        return self.head(self.ln(x))[:, 0], new
