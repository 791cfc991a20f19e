"""V-trace targets and policy-gradient advantages over padded, batch-major trajectories.

Reference: Espeholt et al. 2018, "IMPALA" (https://arxiv.org/abs/1802.01561), eq. (1) and Sec. 4.2.
The seed paper (Sec. 4.1) uses V-trace to evaluate the thresholded policy S̃_{π,κ} from rollouts of π.

Layout: every array is batch-major `[B, T]` with a validity `mask` that is 1 on the valid prefix of
each row. Padding never leaks into valid steps: values, rewards and discounts are zeroed on padding
and the importance ratio is set to 1 there *before* any arithmetic, so garbage (even NaN or inf) in
padded slots cannot reach valid outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class VTraceOutput(NamedTuple):
    """V-trace results, all `[B, T]` float, zero on padding, stop-gradient."""

    vs: jax.Array  # V-trace value targets v_s.
    pg_advantage: jax.Array  # min(ρ̄_pg, ρ_s)·(r_s + γ_s q_{s+1} − V(o_s)).
    td: jax.Array  # r_s + γ_s q_{s+1} − V(o_s): the advantage without its ratio factor.


def _clean(x: jax.Array, mask: jax.Array, fill: float) -> jax.Array:
    return jnp.where(mask, x, jnp.asarray(fill, x.dtype))


def vtrace_targets(
    values: jax.Array,
    bootstrap: jax.Array,
    rewards: jax.Array,
    discounts: jax.Array,
    rho_raw: jax.Array,
    mask: jax.Array,
    *,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    pg_rho_bar: float | None = None,
    lambda_: float = 1.0,
) -> VTraceOutput:
    """V-trace targets v_s and policy-gradient advantages for a padded batch.

    v_s = V(o_s) + Σ_{t≥s} (Π_{i=s}^{t-1} γ_i c_i) δ_t,  δ_t = ρ_t (r_t + γ_t V(o_{t+1}) − V(o_t)),
    ρ_t = min(ρ̄, ρ_t^raw), c_t = λ·min(c̄, ρ_t^raw); computed by a reverse `lax.scan`.

    Args:
      values: `[B, T]` critic values V(o_t).
      bootstrap: `[B]` value of the state after the last slot (used only where the last slot is
        valid and non-terminal; episodic rows have γ = 0 at their terminal step).
      rewards: `[B, T]` per-step rewards r_t (in the stream's own units, e.g. FLOPs in 1e12).
      discounts: `[B, T]` γ_t, the discount applied to the value *after* step t (0 at terminals).
      rho_raw: `[B, T]` raw importance ratios π̃(a_t|o_t)/μ(a_t|o_t), not clipped, not logs.
      mask: `[B, T]` bool, valid steps.
      rho_bar: clip for ρ_t in the value targets.
      c_bar: clip for the trace coefficients c_t.
      pg_rho_bar: clip for the ratio multiplying the policy-gradient advantage (default rho_bar;
        `jnp.inf` leaves it unclipped).
      lambda_: trace mixing λ ∈ [0, 1].

    Returns:
      `VTraceOutput(vs, pg_advantage, td)`, each `[B, T]`, zero on padding, stop-gradient.
    """
    chex.assert_rank([values, rewards, discounts, rho_raw, mask], 2)
    chex.assert_rank(bootstrap, 1)
    chex.assert_equal_shape([values, rewards, discounts, rho_raw, mask])
    pg_rho_bar = rho_bar if pg_rho_bar is None else pg_rho_bar
    mask = mask.astype(bool)
    dtype = values.dtype
    m = mask.astype(dtype)

    values = _clean(values, mask, 0.0)
    rewards = _clean(rewards, mask, 0.0)
    discounts = _clean(discounts, mask, 0.0)
    rho_raw = _clean(rho_raw, mask, 1.0)
    # A valid row's bootstrap only matters if its last slot is valid; elsewhere it is multiplied by
    # a zero discount, but 0·inf = NaN, so sanitise it too.
    last_valid = mask[:, -1]
    bootstrap = jnp.where(last_valid, bootstrap, jnp.zeros_like(bootstrap))

    v_tp1 = jnp.concatenate([values[:, 1:], bootstrap[:, None]], axis=1)
    rho = jnp.minimum(rho_bar, rho_raw)
    cs = lambda_ * jnp.minimum(c_bar, rho_raw)
    deltas = rho * (rewards + discounts * v_tp1 - values) * m

    def body(acc, x):
        delta, disc, c, mm = x
        acc = (delta + disc * c * acc) * mm
        return acc, acc

    _, vs_minus_v = jax.lax.scan(
        body,
        jnp.zeros(values.shape[0], dtype),
        (deltas.T, discounts.T, cs.T, m.T),
        reverse=True,
    )
    vs = (values + vs_minus_v.T) * m
    vs_tp1 = jnp.concatenate([vs[:, 1:], bootstrap[:, None]], axis=1)
    q_tp1 = lambda_ * vs_tp1 + (1.0 - lambda_) * v_tp1
    td = (rewards + discounts * q_tp1 - values) * m
    pg_adv = jnp.minimum(pg_rho_bar, rho_raw) * td
    return VTraceOutput(
        vs=jax.lax.stop_gradient(vs),
        pg_advantage=jax.lax.stop_gradient(pg_adv),
        td=jax.lax.stop_gradient(td),
    )


def episodic_discounts(mask: jax.Array, gamma: float = 1.0) -> jax.Array:
    """`[B, T]` discounts for episodes that end at their last valid step: γ inside, 0 at the end.

    Args:
      mask: `[B, T]` bool validity mask; each row's valid steps form a prefix.
      gamma: per-step discount.
    """
    chex.assert_rank(mask, 2)
    mask = mask.astype(bool)
    nxt = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return jnp.where(mask & nxt, gamma, 0.0).astype(jnp.float32)


def terminal_indicator(mask: jax.Array) -> jax.Array:
    """`[B, T]` float, 1 at each row's last valid step (0 everywhere for an empty row)."""
    chex.assert_rank(mask, 2)
    mask = mask.astype(bool)
    nxt = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return (mask & ~nxt).astype(jnp.float32)
