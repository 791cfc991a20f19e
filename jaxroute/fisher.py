"""Fisher-vector products of a mean KL over flattened parameters (forward-over-reverse).

At θ = θ_k the Hessian of θ ↦ KL(p_{θ_k} ‖ p_θ) is the Fisher information of p_θ, so
F v = ∇_θ[(∇_θ KL̄)ᵀ v] at θ_k. The gradient is linearised once with `jax.linearize` and every CG
iteration reuses that linear map (one JVP through the backward pass per product).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    _, hvp = jax.linearize(jax.grad(mean_kl), flat_params)
    return lambda v: hvp(v) + damping * v


def categorical_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p ‖ q) over the last axis from log-probabilities; 0·log 0 terms count as 0. `[...]`."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
