"""The threshold policy Π_{π,κ}, its behaviour S, the softmask S̃, eq. 6, and coverage estimates.

Actions for K ordered models (seed Sec. 3.1): at a state whose current model is k, action a ∈
{0, …, K−1} means "generate the next segment with model a"; a = k continues, a > k escalates and
a < k is invalid (escalation is one-way). `valid` masks are `[..., K]` bool.

All functions are pure and shape-polymorphic over leading axes (`[..., K]`), so they serve both
single decisions and padded `[B, T, K]` batches.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Finite stand-in for log(0): -inf would give NaN gradients through `where` and 0·inf products.
NEG_INF = -1e30


def _action_ids(model: jax.Array, num_models: int) -> jax.Array:
    """`[..., K]` int: 0..K−1 broadcast to the leading shape of `model` (no implicit rank promotion)."""
    return jnp.broadcast_to(jnp.arange(num_models), jnp.shape(model) + (num_models,))


def valid_actions(model: jax.Array, num_models: int) -> jax.Array:
    """`[..., K]` bool: actions allowed at a state whose current model index is `model` `[...]`."""
    model = jnp.asarray(model)
    return _action_ids(model, num_models) >= model[..., None]


def masked_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """log π(a|o) over the valid actions; NEG_INF on invalid ones. `[..., K]`."""
    chex.assert_equal_shape([logits, valid])
    logits = jnp.where(valid, logits, NEG_INF)
    return jnp.where(valid, jax.nn.log_softmax(logits, axis=-1), NEG_INF)


def action_set(probs: jax.Array, kappa: jax.Array, valid: jax.Array) -> jax.Array:
    """Π_{π,κ}(o) = {a valid : π(a|o) ≥ κ}, with the empty-set rule. `[..., K]` bool.

    An empty set (possible only when κ > 1/K) is replaced by {argmax_a π(a|o)}: the ε → 0 limit of
    the softmask S̃ below, so S and S̃ agree in the limit on every state.
    """
    chex.assert_equal_shape([probs, valid])
    chex.assert_rank(kappa, 0)
    inset = valid & (probs >= kappa)
    empty = ~jnp.any(inset, axis=-1, keepdims=True)
    top = jnp.argmax(jnp.where(valid, probs, -1.0), axis=-1)
    onehot = jax.nn.one_hot(top, probs.shape[-1], dtype=bool)
    return jnp.where(empty, onehot, inset)


def set_behaviour(probs: jax.Array, kappa: jax.Array, valid: jax.Array) -> jax.Array:
    """S_{π,κ}(a|o) = 1{a ∈ Π}/|Π|: uniform over the (non-empty) action set. `[..., K]` float."""
    chex.assert_equal_shape([probs, valid])
    inset = action_set(probs, kappa, valid).astype(probs.dtype)
    return inset / jnp.sum(inset, axis=-1, keepdims=True)


def log_softmask(
    probs: jax.Array, kappa: jax.Array, valid: jax.Array, eps: float = 0.01
) -> jax.Array:
    """log S̃_{π,κ}(a|o): the differentiable relaxation of S, computed in log space. `[..., K]`.

    m_a = σ((π(a|o) − κ)/ε) on valid actions, S̃ = m / Σ m. With ε = 0.01 the sigmoid's argument
    reaches ±100 and σ underflows in float32, so work with log σ and logsumexp. Invalid actions
    get NEG_INF (probability 0).
    """
    chex.assert_equal_shape([probs, valid])
    chex.assert_rank(kappa, 0)
    log_m = jnp.where(valid, jax.nn.log_sigmoid((probs - kappa) / eps), NEG_INF)
    return jnp.where(valid, log_m - jax.nn.logsumexp(log_m, axis=-1, keepdims=True), NEG_INF)


def route(probs: jax.Array, kappa: jax.Array, model: jax.Array) -> jax.Array:
    """Inference rule Γ (seed eq. 6), generalised to K ordered models. `[...]` int.

    Escalate to the largest model a > k with π(a|o) ≥ κ; otherwise continue with the current model
    k. For K = 2 this is exactly eq. 6: escalate iff π(escalate|o) ≥ κ. (When the set holds both
    actions the paper runs the larger model, the action with the highest value.)
    """
    model = jnp.asarray(model)
    chex.assert_rank(probs, model.ndim + 1)
    chex.assert_rank(kappa, 0)
    return route_rule(jnp, probs, kappa, model)


def route_rule(xp, probs, kappa, model):
    """Eq. 6 written once for any array namespace `xp` (`jax.numpy` inside jitted code, `numpy`
    on the host: the serving path and the offline families, decision 79). Same shapes as
    `route`; no checks (`route` is the checked entry)."""
    ids = xp.broadcast_to(xp.arange(probs.shape[-1]), probs.shape)  # no rank promotion
    ok = (ids > model[..., None]) & (probs >= kappa)
    best = xp.max(xp.where(ok, ids, -1), axis=-1)
    return xp.where(best >= 0, best, model).astype(xp.int32)


def escalation_score(xp, probs, model):
    """max_{a > k} π(a|o), `[...]`: the probability eq. 6 compares with κ (0 for the largest
    model). Any array namespace `xp`."""
    higher = xp.broadcast_to(xp.arange(probs.shape[-1]), probs.shape) > model[..., None]
    return xp.max(xp.where(higher, probs, 0.0), axis=-1)


def escalation_in_set(probs: jax.Array, kappa: jax.Array, model: jax.Array) -> jax.Array:
    """`[...]` bool: does Π_{π,κ}(o) contain an escalation (some a > k)? Uses the empty-set rule."""
    k = probs.shape[-1]
    model = jnp.asarray(model)
    chex.assert_rank(probs, model.ndim + 1)
    valid = valid_actions(model, k)
    higher = _action_ids(model, k) > model[..., None]
    return jnp.any(action_set(probs, kappa, valid) & higher, axis=-1)


def log_clipped_weights(
    log_target: jax.Array, log_behaviour: jax.Array, mask: jax.Array, rho_bar: float = 2.0
) -> jax.Array:
    """log W_b = Σ_t mask·min(log ρ̄, log π̃(a_t|o_t) − log μ(a_t|o_t)): the clipped IS product. `[B]`.

    Args:
      log_target: `[B, T]` log-probability of the taken action under the target (S̃ or S).
      log_behaviour: `[B, T]` log-probability of the taken action under the behaviour π_k.
      mask: `[B, T]` bool.
      rho_bar: the per-step clip ρ̄ (seed Sec. 4.1: ρ̄ = 2).
    """
    chex.assert_rank([log_target, log_behaviour, mask], 2)
    chex.assert_equal_shape([log_target, log_behaviour, mask])
    diff = jnp.where(mask, log_target - log_behaviour, 0.0)
    return jnp.sum(jnp.minimum(jnp.log(rho_bar), diff), axis=-1)


def coverage_estimate(
    log_weights: jax.Array,
    correct: jax.Array,
    large_wrong: jax.Array,
    estimator: str = "exact",
) -> jax.Array:
    """IS estimate of the coverage P(R_Π = 1 ∨ R_M = 0) from rollouts of π. Scalar.

    - "union_bound" (seed Sec. 4.1): E_π[W·1{R_π=1}] + P(R_M=0). Over-counts problems where both
      hold, so it can exceed the true coverage (and 1).
    - "exact": P(R_M=0) + E_π[W·1{R_π=1}·1{R_M=1}], using that R_M is known per problem.

    Args:
      log_weights: `[B]` log W_b from `log_clipped_weights`.
      correct: `[B]` bool, R_π(x_b) = 1.
      large_wrong: `[B]` bool, R_M(x_b) = 0.
      estimator: "exact" or "union_bound".
    """
    chex.assert_rank([log_weights, correct, large_wrong], 1)
    chex.assert_equal_shape([log_weights, correct, large_wrong])
    w = jnp.exp(log_weights)
    correct = correct.astype(w.dtype)
    large_wrong = large_wrong.astype(w.dtype)
    if estimator == "exact":
        return jnp.mean(large_wrong) + jnp.mean(w * correct * (1.0 - large_wrong))
    if estimator == "union_bound":
        return jnp.mean(large_wrong) + jnp.mean(w * correct)
    raise ValueError(f"coverage estimator must be 'exact' or 'union_bound', got {estimator!r}")
