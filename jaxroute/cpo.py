"""Constrained Policy Optimization step for one constraint (Achiam et al. 2017, Sec. 6.1, App. 10.2).

The trust-region subproblem in minimise form, around θ_k with x = θ − θ_k:

    min_x gᵀx   s.t.   bᵀx + c ≤ 0,   ½ xᵀ H x ≤ δ,

g = ∇(objective to minimise), b = ∇(constraint quantity), c = constraint value − limit (c < 0 means
θ_k is feasible), H the (damped) Fisher. With v = H⁻¹g, w = H⁻¹b, q = gᵀv, r = gᵀw, s = bᵀw the
dual is solved in closed form; the case logic follows safety-starter-agents' `CPOAgent`:

    case 4: b ≈ 0 and feasible        → TRPO step           x = −√(2δ/q)·v
    case 3: feasible, TR inside set   → TRPO step
    case 2: feasible, boundary cuts TR→ x = −(v + ν w)/λ
    case 1: infeasible, recoverable   → x = −(v + ν w)/λ
    case 0: infeasible, no feasible x → recovery           x = −√(2δ/s)·w

Everything is branch-free (`jnp.where`) so it jits and vmaps. Every division and square root is
guarded; a non-finite input gives case −1 and a zero step rather than NaN parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

EPS = 1e-8


class CPODual(NamedTuple):
    lam: jax.Array  # () λ*, multiplier of the trust region.
    nu: jax.Array  # () ν*, multiplier of the linearised constraint.
    case: jax.Array  # () int32 in {−1 (non-finite input), 0, 1, 2, 3, 4}.


def _safe_div(num, den):
    return num / jnp.where(jnp.abs(den) < EPS, jnp.where(den < 0, -EPS, EPS), den)


def cpo_dual(q, r, s, c, delta, b_sq, *, b_sq_tol: float = 1e-8) -> CPODual:
    """Closed-form optimal multipliers (λ*, ν*) of the CPO subproblem, with its case.

    Args:
      q: gᵀH⁻¹g (≥ 0).
      r: gᵀH⁻¹b.
      s: bᵀH⁻¹b (≥ 0).
      c: constraint value minus limit (here: miscoverage − α).
      delta: trust-region radius δ of ½xᵀHx ≤ δ (a mean-KL bound).
      b_sq: bᵀb, to detect a vanishing constraint gradient (case 4).
      b_sq_tol: threshold on bᵀb for case 4.
    """
    q = jnp.maximum(q, 0.0)
    s = jnp.maximum(s, 0.0)
    big_a = q - _safe_div(r**2, s)  # ≥ 0 by Cauchy–Schwarz in the H⁻¹ inner product
    big_b = 2.0 * delta - _safe_div(c**2, s)
    finite = jnp.isfinite(q) & jnp.isfinite(r) & jnp.isfinite(s) & jnp.isfinite(c)
    case = jnp.where(
        (b_sq <= b_sq_tol) & (c < 0),
        4,
        jnp.where(
            (c < 0) & (big_b < 0),
            3,
            jnp.where((c < 0) & (big_b >= 0), 2, jnp.where((c >= 0) & (big_b >= 0), 1, 0)),
        ),
    )
    case = jnp.where(finite, case, -1).astype(jnp.int32)

    lam_trpo = jnp.sqrt(_safe_div(q, 2.0 * delta))
    rc = _safe_div(r, c)
    # λ ranges of the two pieces of the dual (starter-agents: LA = [0, r/c], LB = [r/c, ∞),
    # swapped when c ≥ 0).
    la_lo, la_hi = jnp.where(c < 0, 0.0, rc), jnp.where(c < 0, rc, jnp.inf)
    lb_lo, lb_hi = jnp.where(c < 0, rc, 0.0), jnp.where(c < 0, jnp.inf, rc)

    def proj(x, lo, hi):  # max(lo, min(hi, x)); an empty interval returns lo, as in the reference.
        return jnp.maximum(lo, jnp.minimum(hi, x))

    lam_a = proj(jnp.sqrt(jnp.maximum(_safe_div(big_a, big_b), 0.0)), la_lo, la_hi)
    lam_b = proj(lam_trpo, lb_lo, lb_hi)
    f_a = -0.5 * (_safe_div(big_a, lam_a + EPS) + big_b * lam_a) - _safe_div(r * c, s + EPS)
    f_b = -0.5 * (_safe_div(q, lam_b + EPS) + 2.0 * delta * lam_b)
    lam12 = jnp.where(f_a >= f_b, lam_a, lam_b)
    nu12 = jnp.maximum(0.0, lam12 * c - r) / (s + EPS)

    lam = jnp.where(case >= 3, lam_trpo, jnp.where(case >= 1, lam12, 0.0))
    nu = jnp.where(case >= 3, 0.0, jnp.where(case >= 1, nu12, jnp.sqrt(_safe_div(2.0 * delta, s))))
    lam = jnp.where(case < 0, 0.0, lam)
    nu = jnp.where(case < 0, 0.0, nu)
    return CPODual(lam=lam, nu=nu, case=case)


def cpo_direction(v: jax.Array, w: jax.Array, dual: CPODual) -> jax.Array:
    """Full step x (before line search) from the CG solutions v = H⁻¹g, w = H⁻¹b. `[N]`."""
    x = jnp.where(dual.case > 0, -(v + dual.nu * w) / (dual.lam + EPS), -dual.nu * w)
    return jnp.where((dual.case >= 0) & jnp.all(jnp.isfinite(x)), x, jnp.zeros_like(x))


class LineSearchResult(NamedTuple):
    step: jax.Array  # [N] accepted step (zero if nothing was acceptable).
    accepted: jax.Array  # () bool.
    fraction: jax.Array  # () accepted fraction of the full step (0 if rejected).
    kl: jax.Array  # () KL at the accepted point (0 if rejected).
    objective: jax.Array  # () objective surrogate at the accepted point.
    constraint: jax.Array  # () constraint surrogate at the accepted point.


def line_search(
    evaluate: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
    full_step: jax.Array,
    *,
    case: jax.Array,
    c: jax.Array,
    objective_old: jax.Array,
    constraint_old: jax.Array,
    max_kl: float,
    backtrack_coeff: float = 0.8,
    backtrack_iters: int = 10,
) -> LineSearchResult:
    """Backtracking line search with CPO's acceptance rules, all candidates evaluated in one vmap.

    Candidate j is the step coeff^j·x. It is acceptable when
      KL ≤ max_kl, finite;
      objective_new ≤ objective_old, required only when the step optimises the objective
        (case ≥ 2; in recovery cases 0–1 only the constraint matters);
      constraint_new − constraint_old ≤ max(−c, 0) (never break a feasible constraint by more
        than its slack).
    The first acceptable j is taken; if none is acceptable the step is zero (θ_k is kept).

    Args:
      evaluate: x ↦ (KL, objective surrogate, constraint surrogate) at θ_k + x.
      full_step: `[N]` x from `cpo_direction`.
      case, c: from the dual.
      objective_old, constraint_old: the surrogates at θ_k.
      max_kl: δ.
    """
    fracs = backtrack_coeff ** jnp.arange(backtrack_iters, dtype=full_step.dtype)
    kl, obj, con = jax.vmap(lambda f: evaluate(f * full_step))(fracs)
    improve_ok = (obj <= objective_old) | (case <= 1)
    ok = (
        jnp.isfinite(kl)
        & jnp.isfinite(obj)
        & jnp.isfinite(con)
        & (kl <= max_kl)
        & improve_ok
        & (con - constraint_old <= jnp.maximum(-c, 0.0))
        & (case >= 0)
    )
    any_ok = jnp.any(ok)
    j = jnp.argmax(ok)
    frac = jnp.where(any_ok, fracs[j], 0.0)
    return LineSearchResult(
        step=frac * full_step,
        accepted=any_ok,
        fraction=frac,
        kl=jnp.where(any_ok, kl[j], 0.0),
        objective=jnp.where(any_ok, obj[j], objective_old),
        constraint=jnp.where(any_ok, con[j], constraint_old),
    )
