"""Fisher-vector products of a mean KL over flattened parameters.

At θ = θ_k the Hessian of θ ↦ KL(p_{θ_k} ‖ p_θ) is the Fisher information of p_θ. Two forms:
`make_fvp` (forward-over-reverse: F v = ∇_θ[(∇_θ KL̄)ᵀ v], the gradient linearised once) is the
reference; `make_ggn_fvp` (Gauss–Newton, Jᵀ H_u J, decision 13) is the product itself, and
`categorical_kl_fvp` assembles it for the categorical-KL trust region both learners use (per-row
K×K logit Hessians, weighted like the mean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def flatten(params: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """`(flat [N], unravel)` for a parameter pytree."""
    return ravel_pytree(params)


def make_fvp(
    mean_kl: Callable[[jax.Array], jax.Array],
    flat_params: jax.Array,
    damping: float = 0.1,
) -> Callable[[jax.Array], jax.Array]:
    """Damped Fisher-vector product v ↦ (F + damping·I) v, `[N] -> [N]`.

    Args:
      mean_kl: flat θ ↦ scalar mean KL(p_{θ_k} ‖ p_θ), with p_{θ_k} held fixed (stop-gradient)
        inside; minimised (zero value and gradient) at θ = `flat_params`.
      flat_params: `[N]` θ_k.
      damping: Tikhonov damping added to F (keeps CG well posed where F is singular).
    """
    chex.assert_rank(flat_params, 1)
    _, hvp = jax.linearize(jax.grad(mean_kl), flat_params)
    return lambda v: hvp(v) + damping * v


def make_ggn_fvp(
    outputs: Callable[[jax.Array], jax.Array],
    flat_params: jax.Array,
    output_hessian: jax.Array,
    damping: float = 0.1,
) -> Callable[[jax.Array], jax.Array]:
    """Damped Fisher-vector product in Gauss–Newton form, v ↦ (Jᵀ H_u J + damping·I) v.

    For a KL whose first argument is the distribution at θ_k, the output-space gradient vanishes at
    θ_k, so the Hessian of the mean KL *is* Jᵀ H_u J exactly (no second-derivative-of-network term):
    the same F as `make_fvp`, but each product costs one JVP plus one transposed JVP through the
    network instead of a JVP through its backward pass, and F is PSD by construction.

    Args:
      outputs: flat θ ↦ network outputs u `[..., K]` (e.g. policy logits for every decision).
      flat_params: `[N]` θ_k.
      output_hessian: `[..., K, K]` ∂²(weighted KL)/∂u² at u(θ_k), per output row, including
        the averaging weights (mask / Σ mask).
      damping: Tikhonov damping.
    """
    chex.assert_rank(flat_params, 1)
    _, jvp = jax.linearize(outputs, flat_params)
    vjp = jax.linear_transpose(jvp, flat_params)

    def fvp(v):
        ju = jvp(v)
        return vjp(jnp.einsum("...ij,...j->...i", output_hessian, ju))[0] + damping * v

    return fvp


def categorical_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p ‖ q) over the last axis from log-probabilities; 0·log 0 terms count as 0. `[...]`."""
    chex.assert_equal_shape([log_p, log_q])
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def categorical_kl_fvp(
    logits_of: Callable[[jax.Array], jax.Array],
    flat_params: jax.Array,
    logits: jax.Array,
    ref_log_probs: jax.Array,
    valid: jax.Array,
    weights: jax.Array,
    log_probs_of_logits: Callable[[jax.Array, jax.Array], jax.Array],
    damping: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
    """Fisher-vector product of the trust region Σ w · KL(ref ‖ q(u(θ))) at θ_k, in Gauss–Newton
    form: the K×K Hessian of each row's KL in logit space (exact, by autodiff), weighted by
    `weights`, then `make_ggn_fvp`. The one Fisher of both learners (TCPO: q = the softmask
    S̃; exact CPO: q = π).

    Args:
      logits_of: flat θ ↦ logits `[..., K]`.
      flat_params: `[N]` θ_k.
      logits: `[..., K]` logits_of(θ_k) (already computed by the caller).
      ref_log_probs: `[..., K]` log q at θ_k (held fixed).
      valid: `[..., K]` bool valid actions.
      weights: `[...]` the mean's weights (e.g. mask / Σ mask); rows of weight 0 drop out.
      log_probs_of_logits: (u `[K]`, valid `[K]`) ↦ log q `[K]`, the map from logits to the
        distribution the trust region is on.
      damping: Tikhonov damping.
    """
    chex.assert_equal_shape([logits, ref_log_probs, valid])
    chex.assert_rank(weights, logits.ndim - 1)
    k = logits.shape[-1]

    def kl_of_logits(u, ref, ok):
        return categorical_kl(ref, log_probs_of_logits(u, ok))

    rows = lambda x: x.reshape(-1, k)  # noqa: E731
    h_u = jax.vmap(jax.hessian(kl_of_logits))(rows(logits), rows(ref_log_probs), rows(valid))
    h_u = h_u.reshape(weights.shape + (k, k)) * weights[..., None, None]
    return make_ggn_fvp(logits_of, flat_params, h_u, damping=damping)
