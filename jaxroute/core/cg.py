"""Conjugate gradient for symmetric positive-definite systems given only matrix-vector products.

Used to solve (F + damping·I) x = g for the CPO directions, where F is the Fisher matrix of the
trust region's mean KL, available only as a product (`fisher.categorical_kl_fvp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class CGResult(NamedTuple):
    x: jax.Array  # [N] approximate solution.
    iterations: jax.Array  # () int32, iterations run.
    residual_norm: jax.Array  # () ‖b − A x‖ as tracked by the recursion.
    breakdown: jax.Array  # () bool, stopped because pᵀAp ≤ 0 (A not positive definite along p).


def conjugate_gradient(
    matvec: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    *,
    iters: int = 10,
    tol: float = 1e-10,
    eps: float = 1e-8,
) -> CGResult:
    """Solve A x = b from x₀ = 0 with at most `iters` CG iterations.

    Stops early when ‖r‖ < tol, or on breakdown: if pᵀAp ≤ eps·‖p‖² the curvature along p is not
    positive (round-off, or A not PD) and a step would divide by ~0, so the current x is kept.

    Args:
      matvec: v ↦ A v for a symmetric positive (semi-)definite A, `[N] -> [N]`.
      b: `[N]` right-hand side.
      iters: maximum number of iterations (starter-agents CPO: 10).
      tol: residual-norm tolerance for early exit.
      eps: relative curvature floor for the breakdown guard.

    Returns:
      `CGResult`; `x` is finite whenever `b` and `matvec` are.
    """
    chex.assert_rank(b, 1)

    def cond(state):
        i, _, _, _, rr, broke = state
        return (i < iters) & (jnp.sqrt(rr) >= tol) & ~broke

    def body(state):
        i, x, r, p, rr, _ = state
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        broke = pap <= eps * jnp.vdot(p, p)
        alpha = rr / jnp.where(broke, 1.0, pap)
        x_new = x + alpha * p
        r_new = r - alpha * ap
        rr_new = jnp.vdot(r_new, r_new)
        p_new = r_new + (rr_new / jnp.maximum(rr, jnp.finfo(rr.dtype).tiny)) * p
        keep = lambda new, old: jnp.where(broke, old, new)  # noqa: E731
        return (
            i + jnp.where(broke, 0, 1),
            keep(x_new, x),
            keep(r_new, r),
            keep(p_new, p),
            keep(rr_new, rr),
            broke,
        )

    init = (jnp.int32(0), jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.asarray(False))
    i, x, _, _, rr, broke = jax.lax.while_loop(cond, body, init)
    return CGResult(x=x, iterations=i, residual_norm=jnp.sqrt(rr), breakdown=broke)
