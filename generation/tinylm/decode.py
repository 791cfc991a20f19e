"""The tiny models' decode-state plumbing shared by `generation.tinylm.backend` (`generate`)
and `generation.tinylm.streamer` (answer streams): the per-row state and the jitted gathers,
scatters and bucketing that move rows between batches on the device."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


@jax.jit
def _take(tree, rows):
    """Rows `rows` of every array in `tree` (one dispatch, not one per leaf)."""
    return jax.tree.map(lambda x: x[rows], tree)


def _fit(c, length: int):
    """K/V `[R, H, L, Dh]` cut or zero-padded to `length` positions (a row's K/V beyond its
    position is never attended)."""
    if c.shape[2] >= length:
        return c[:, :, :length]
    return jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0)))


@functools.partial(jax.jit, static_argnames=("rows", "length"))
def _empty_batch(logits_like, caches_like, rows: int, length: int):
    """Zero (logits `[rows, V]`, caches `[rows, H, length, Dh]`) shaped like a held state's."""
    return (jnp.zeros((rows,) + logits_like.shape[1:], logits_like.dtype),
            tuple(tuple(jnp.zeros((rows, c.shape[1], length, c.shape[3]), c.dtype) for c in kv)
                  for kv in caches_like))


@functools.partial(jax.jit, donate_argnums=(0,))
def _place(batch, tree, dst):
    """`batch` (updated in place) with row dst[j] := row j of `tree` for every j whose dst is
    in range (others are dropped). Compiles per (batch shape, source shape) — never per
    combination of sources, which kept hundreds of MB of executables (decision 81)."""
    logits, caches = batch
    t_logits, t_caches = tree
    length = caches[0][0].shape[2]
    logits = logits.at[dst].set(t_logits, mode="drop")
    caches = tuple((k.at[dst].set(_fit(tk, length), mode="drop"),
                    v.at[dst].set(_fit(tv, length), mode="drop"))
                   for (k, v), (tk, tv) in zip(caches, t_caches, strict=True))
    return logits, caches


@jax.jit
def _keys(seeds):
    return jax.vmap(jax.random.PRNGKey)(seeds)


def _nbytes(entry) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(entry))


def _bucket(n: int, step: int) -> int:
    return int(-(-max(n, 1) // step) * step)


def _padded(idx: list[int], n: int) -> list[int]:
    """`idx` repeated at its first element up to length n (a handful of compiled shapes)."""
    return list(idx) + [idx[0]] * (n - len(idx))


def _cache_len(tokens: int, max_len: int) -> int:
    """K/V cache length of a call whose rows reach at most `tokens` positions: a multiple of 64
    (three compiled lengths for the committed models), at most the context. Attention and the
    host copies of a call scale with it, so short steps do not pay for the whole context."""
    return min(max_len, _bucket(tokens + 1, 64))


def _rows(n: int) -> int:
    """Batch rows: a power of two ≥ 8, so the jitted loop compiles for a handful of shapes."""
    return max(8, 1 << (max(n, 1) - 1).bit_length())


class DecodeState(NamedTuple):
    """Per-row sampling state `[R, …]`, enough to resume decoding anywhere."""

    logits: jax.Array  # [R, V] next-token raw logits
    caches: tuple  # per layer (k, v), each [R, H, L_max, Dh]
    pos: jax.Array  # [R] position the next token is written to
    prev: jax.Array  # [R] previously sampled token in this call (-1 at a call's start)
    budget: jax.Array  # [R] new tokens this row may still generate
    keys: jax.Array  # [R, 2] PRNG key of each row's sample stream (folded with the position)
    done: jax.Array  # [R] bool


