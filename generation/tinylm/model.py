"""A tiny decoder-only transformer LM in flax, in the Qwen2 layout, with a KV cache for batched
sampling.

The layout is exactly Hugging Face's / vLLM's `Qwen2ForCausalLM` (decision 85): RMSNorm before
attention and MLP, rotary position embeddings (half-split `rotate_half` convention), q/k/v
projections with bias and an output projection without, a SwiGLU MLP without biases, a final
RMSNorm and an untied LM head without bias. Head dimension 32 (vLLM's CPU attention takes
head_dim ∈ {32, 64, 80, 96, 112, 128, …}). So the same weights load in `transformers` and in a
real vLLM engine (`generation.tinylm.hf_export`), and the PRM stand-in is a
`Qwen2ForProcessRewardModel` on the same backbone.

Character-level tokenizer (`Tokenizer`): the task's alphabet plus the special tokens. `__call__`
is the training forward; `prefill` and `decode` share its parameters and keep per-layer K/V
caches `[B, H, L, D_h]` (K after the rotary embedding; L ≤ max_len, chosen per call by the
backend).
"""

from __future__ import annotations

import dataclasses
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.errors import InputError

# <extra_0> is the step tag of the Qwen2.5-Math-PRM layout (the PRM stand-in reads its score
# there); <unk> stands for any character outside the alphabet in the exported HF tokenizer.
SPECIALS = ("<pad>", "<bos>", "<eos>", "<asst>", "<extra_0>", "<unk>")
ALPHABET = string.ascii_letters + string.digits + " .,?!+-*=/\\{}()\n'"


class Tokenizer:
    def __init__(self):
        self.itos = list(SPECIALS) + list(ALPHABET)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.asst, self.step_tag, self.unk = range(len(SPECIALS))

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

    def token_text(self, i: int) -> str:
        """The text of one token ("" for a special token)."""
        return self.itos[i] if i >= len(SPECIALS) else ""

    def prompt(self, question: str) -> list[int]:
        return [self.bos] + self.encode(question) + [self.asst]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab: int
    layers: int = 2
    d_model: int = 64
    heads: int = 2
    max_len: int = 192
    mlp: int = 176  # SwiGLU width (≈ 8/3 · d_model: the parameters of a 4·d GELU MLP)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def num_params(self) -> int:
        d, v, l, f = self.d_model, self.vocab, self.layers, self.mlp
        block = 4 * d * d + 3 * d + 3 * d * f + 2 * d  # q,k,v,o (+ q,k,v bias), SwiGLU, 2 norms
        return v * d + l * block + d + d * v


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * w.reshape((1,) * (x.ndim - 1) + (-1,))


def rope(x, pos, theta: float):
    """Rotary embedding of `x` `[B, H, L, Dh]` at positions `pos` `[B, L]` — HF's convention:
    frequencies θ^(−2i/Dh) for the first half, duplicated, and rotate_half(x) = (−x₂, x₁)."""
    dh = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    freqs = pos[..., None].astype(jnp.float32) * inv.reshape(1, 1, -1)  # [B, L, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None]  # [B, 1, L, Dh]
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.cos(emb) + rotated * jnp.sin(emb)


class Block(nn.Module):
    cfg: LMConfig

    def setup(self):
        d, f = self.cfg.d_model, self.cfg.mlp
        self.input_layernorm = RMSNorm(self.cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(self.cfg.norm_eps)
        self.q_proj, self.k_proj, self.v_proj = nn.Dense(d), nn.Dense(d), nn.Dense(d)
        self.o_proj = nn.Dense(d, use_bias=False)
        self.gate_proj = nn.Dense(f, use_bias=False)
        self.up_proj = nn.Dense(f, use_bias=False)
        self.down_proj = nn.Dense(d, use_bias=False)

    def _split(self, x):  # [B, L, D] -> [B, H, L, Dh]
        b, l, d = x.shape
        return x.reshape(b, l, self.cfg.heads, d // self.cfg.heads).transpose(0, 2, 1, 3)

    def _qkv(self, x, pos):
        h = self.input_layernorm(x)
        q = rope(self._split(self.q_proj(h)), pos, self.cfg.rope_theta)
        k = rope(self._split(self.k_proj(h)), pos, self.cfg.rope_theta)
        return q, k, self._split(self.v_proj(h))

    def _out(self, x, q, k, v, visible):
        att = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
        att = jnp.where(visible, att, -1e30)
        y = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(att, -1), v)
        x = x + self.o_proj(y.transpose(0, 2, 1, 3).reshape(x.shape))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(nn.silu(self.gate_proj(h)) * self.up_proj(h))

    def __call__(self, x, mask):
        b, l, _ = x.shape
        q, k, v = self._qkv(x, jnp.broadcast_to(jnp.arange(l), (b, l)))
        return self._out(x, q, k, v, mask), (k, v)

    def step(self, x, k_cache, v_cache, pos):
        """One new token per row at positions `pos` [B]; caches [B, H, L, Dh]."""
        q, k, v = self._qkv(x, pos[:, None])  # x [B, 1, D]
        rows = jnp.arange(x.shape[0])
        k_cache = k_cache.at[rows, :, pos].set(k[:, :, 0])
        v_cache = v_cache.at[rows, :, pos].set(v[:, :, 0])
        visible = jnp.arange(k_cache.shape[2])[None, :] <= pos[:, None]  # [B, L]
        return self._out(x, q, k_cache, v_cache, visible[:, None, None, :]), k_cache, v_cache


class TinyLM(nn.Module):
    cfg: LMConfig

    def setup(self):
        self.embed_tokens = nn.Embed(self.cfg.vocab, self.cfg.d_model)
        self.blocks = [Block(self.cfg) for _ in range(self.cfg.layers)]
        self.norm = RMSNorm(self.cfg.norm_eps)
        self.lm_head = nn.Dense(self.cfg.vocab, use_bias=False)

    def hidden(self, tokens):
        """Final (normed) hidden states `[B, L, D]`: the backbone a reward head reads."""
        l = tokens.shape[1]
        x = self.embed_tokens(tokens)
        mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
        for blk in self.blocks:
            x, _ = blk(x, mask)
        return self.norm(x)

    def __call__(self, tokens):
        """Training forward: logits `[B, L, V]` (raw, pre-softmax)."""
        return self.lm_head(self.hidden(tokens))

    def prefill(self, tokens, lengths, cache_len: int | None = None):
        """Logits at each row's last prompt token `[B, V]` and K/V caches `[B, H, cache_len, Dh]`
        (zero beyond the prompt; `cache_len` ≥ the prompt width, max_len by default)."""
        b, l = tokens.shape
        cache_len = self.cfg.max_len if cache_len is None else cache_len
        x = self.embed_tokens(tokens)
        mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
        caches = []
        for blk in self.blocks:
            x, (k, v) = blk(x, mask)
            pad = ((0, 0), (0, 0), (0, cache_len - l), (0, 0))
            caches.append((jnp.pad(k, pad), jnp.pad(v, pad)))
        logits = self.lm_head(self.norm(x))
        return logits[jnp.arange(b), lengths - 1], caches

    def decode(self, token, caches, pos):
        """Feed one token per row at position `pos` [B]; returns logits [B, V] and caches."""
        x = self.embed_tokens(token[:, None])
        new = []
        for blk, (k, v) in zip(self.blocks, caches, strict=True):
            x, k, v = blk.step(x, k, v, pos)
            new.append((k, v))
        return self.lm_head(self.norm(x))[:, 0], new
