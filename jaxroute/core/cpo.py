"""Constrained Policy Optimization step for one constraint (Achiam et al. 2017, Sec. 6.1, App. 10.2).

The trust-region subproblem of the paper's eq. 4, in minimise form around θ_k with x = θ − θ_k:

    min_x gᵀx   s.t.   bᵀx + c ≤ 0,   ½ xᵀ H x ≤ δ,

g = ∇(objective to minimise), b = ∇(constraint quantity), c = constraint value − limit (c < 0 means
θ_k is feasible), H the damped Fisher. With v = H⁻¹g, w = H⁻¹b, q = vᵀHv, r = wᵀHv, s = wᵀHw the
dual is solved in closed form; the case logic follows safety-starter-agents' `CPOAgent`:

    case 4: b ≈ 0 and feasible        → TRPO step           x = −√(2δ/q)·v
    case 3: feasible, TR inside set   → TRPO step
    case 2: feasible, boundary cuts TR→ x = −(v + ν w)/λ
    case 1: infeasible, recoverable   → x = −(v + ν w)/λ
    case 0: infeasible, no feasible x → recovery           x = −√(2δ/s)·w

`cpo_step` is the whole of eq. 4 as one kernel (both natural-gradient solves, dual, direction,
backtracking line search); `cpo_dual`, `cpo_direction` and `line_search` are its parts.
Everything is branch-free (`jnp.where`) so it jits and vmaps. Divisions are guarded only against
an exact zero (decision 18): the reference implementation's ε added to s and λ bends the step
when s = bᵀH⁻¹b is itself small (decision 62).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxroute.core.cg import conjugate_gradient

# Guard of a division by (exactly) zero. Small enough not to bias any finite float32 quotient that
# matters here (s = bᵀH⁻¹b reaches 1e-10 for |b| = 1e-4), see decision 62.
TINY = 1e-30


class CPODual(NamedTuple):
    lam: jax.Array  # () λ*, multiplier of the trust region.
    nu: jax.Array  # () ν*, multiplier of the linearised constraint.
    case: jax.Array  # () int32 in {−1 (non-finite input), 0, 1, 2, 3, 4}.


def _safe_div(num, den):
    return num / jnp.where(jnp.abs(den) < TINY, jnp.where(den < 0, -TINY, TINY), den)


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
    chex.assert_rank([q, r, s, c, b_sq], 0)
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
    f_a = -0.5 * (_safe_div(big_a, lam_a) + big_b * lam_a) - _safe_div(r * c, s)
    f_b = -0.5 * (_safe_div(q, lam_b) + 2.0 * delta * lam_b)
    lam12 = jnp.where(f_a >= f_b, lam_a, lam_b)
    nu12 = _safe_div(jnp.maximum(0.0, lam12 * c - r), s)

    lam = jnp.where(case >= 3, lam_trpo, jnp.where(case >= 1, lam12, 0.0))
    nu = jnp.where(case >= 3, 0.0, jnp.where(case >= 1, nu12, jnp.sqrt(_safe_div(2.0 * delta, s))))
    lam = jnp.where(case < 0, 0.0, lam)
    nu = jnp.where(case < 0, 0.0, nu)
    return CPODual(lam=lam, nu=nu, case=case)


def cpo_direction(v: jax.Array, w: jax.Array, dual: CPODual) -> jax.Array:
    """Full step x (before line search) from the CG solutions v = H⁻¹g, w = H⁻¹b. `[N]`."""
    chex.assert_rank([v, w], 1)
    chex.assert_equal_shape([v, w])
    x = jnp.where(dual.case > 0, -_safe_div(v + dual.nu * w, dual.lam), -dual.nu * w)
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
    constraint_tol: float = 0.0,
) -> LineSearchResult:
    """Backtracking line search with CPO's acceptance rules, all candidates evaluated in one vmap.

    Candidate j is the step coeff^j·x. It is acceptable when
      KL ≤ max_kl, finite;
      objective_new ≤ objective_old, required only when the step optimises the objective
        (case ≥ 2; in recovery cases 0–1 only the constraint matters);
      constraint_new − constraint_old ≤ max(−c, 0) + constraint_tol (never break a feasible
        constraint by more than its slack; a small tolerance lets a step move along an active,
        curved constraint instead of stalling there — decision 67).
    The first acceptable j is taken; if none is acceptable the step is zero (θ_k is kept).

    Args:
      evaluate: x ↦ (KL, objective surrogate, constraint surrogate) at θ_k + x.
      full_step: `[N]` x from `cpo_direction`.
      case, c: from the dual.
      objective_old, constraint_old: the surrogates at θ_k.
      max_kl: δ.
    """
    chex.assert_rank(full_step, 1)
    fracs = backtrack_coeff ** jnp.arange(backtrack_iters, dtype=full_step.dtype)
    kl, obj, con = jax.vmap(lambda f: evaluate(f * full_step))(fracs)
    improve_ok = (obj <= objective_old) | (case <= 1)
    ok = (
        jnp.isfinite(kl)
        & jnp.isfinite(obj)
        & jnp.isfinite(con)
        & (kl <= max_kl)
        & improve_ok
        & (con - constraint_old <= jnp.maximum(-c, 0.0) + constraint_tol)
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


class CPOInfo(NamedTuple):
    """Diagnostics of one `cpo_step`, all scalars."""

    q: jax.Array  # vᵀHv, v = H⁻¹g
    r: jax.Array  # wᵀHv, w = H⁻¹b
    s: jax.Array  # wᵀHw
    lam: jax.Array
    nu: jax.Array
    case: jax.Array  # int32, see `cpo_dual`
    cg_iterations: jax.Array  # int32, iterations of the g solve
    cg_residual: jax.Array  # residual norm of the g solve
    accepted: jax.Array  # bool, the line search found an admissible fraction
    fraction: jax.Array  # accepted fraction of the full step (0 if rejected)
    kl: jax.Array  # KL at the accepted point
    objective: jax.Array  # objective surrogate at the accepted point
    constraint: jax.Array  # constraint surrogate at the accepted point


def cpo_step(
    g: jax.Array,
    b: jax.Array,
    c: jax.Array,
    fvp: Callable[[jax.Array], jax.Array],
    evaluate: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]] | None = None,
    *,
    max_kl: float,
    damping: float = 0.0,
    cg_iters: int = 10,
    cg_tol: float = 1e-10,
    b_sq_tol: float = 1e-8,
    objective_old: jax.Array | float = 0.0,
    constraint_old: jax.Array | float = 0.0,
    backtrack_coeff: float = 0.8,
    backtrack_iters: int = 10,
    constraint_tol: float = 0.0,
) -> tuple[jax.Array, CPOInfo]:
    """One CPO step (the paper's eq. 4): solve H v = g and H w = b by CG (one vmapped loop), the
    closed-form dual, the direction, and CPO's backtracking line search.

    Args:
      g: `[N]` gradient of the objective to minimise at θ_k.
      b: `[N]` gradient of the constraint quantity at θ_k.
      c: `()` constraint value minus its limit at θ_k (c < 0: feasible).
      fvp: v ↦ F v, the Fisher-vector product of the trust-region KL at θ_k, `[N] -> [N]`.
      evaluate: x ↦ (KL, objective, constraint) at θ_k + x for the line search; None returns the
        full step (accepted, fraction 1).
      max_kl: δ of ½xᵀHx ≤ δ and of the line search's KL test.
      damping: added to F (H = F + damping·I).
      cg_iters, cg_tol: CG budget per right-hand side.
      b_sq_tol: bᵀb at or below which the constraint gradient counts as zero (case 4).
      objective_old, constraint_old: surrogates at θ_k (line-search acceptance).
      backtrack_coeff, backtrack_iters: candidates coeff^j·x, j < iters.
      constraint_tol: slack added to the line search's constraint test (`line_search`).

    Returns:
      (step `[N]` to add to θ_k — zero when nothing was admissible or an input was non-finite,
      `CPOInfo`).
    """
    chex.assert_rank([g, b], 1)
    chex.assert_equal_shape([g, b])
    chex.assert_rank(c, 0)

    def hvp(v):
        return fvp(v) + damping * v

    sol = jax.vmap(lambda rhs: conjugate_gradient(hvp, rhs, iters=cg_iters, tol=cg_tol))(
        jnp.stack([g, b]))
    vw = sol.x
    hvw = jax.vmap(hvp)(vw)
    q, r, s = jnp.vdot(vw[0], hvw[0]), jnp.vdot(vw[1], hvw[0]), jnp.vdot(vw[1], hvw[1])
    dual = cpo_dual(q, r, s, c, max_kl, jnp.vdot(b, b), b_sq_tol=b_sq_tol)
    full = cpo_direction(vw[0], vw[1], dual)
    if evaluate is None:
        ok = dual.case >= 0
        search = LineSearchResult(step=full, accepted=ok, fraction=jnp.where(ok, 1.0, 0.0),
                                  kl=0.5 * jnp.vdot(full, hvp(full)),
                                  objective=jnp.asarray(objective_old, full.dtype) + g @ full,
                                  constraint=jnp.asarray(constraint_old, full.dtype) + b @ full)
    else:
        search = line_search(evaluate, full, case=dual.case, c=c, objective_old=objective_old,
                             constraint_old=constraint_old, max_kl=max_kl,
                             backtrack_coeff=backtrack_coeff, backtrack_iters=backtrack_iters,
                             constraint_tol=constraint_tol)
    info = CPOInfo(q=q, r=r, s=s, lam=dual.lam, nu=dual.nu, case=dual.case,
                   cg_iterations=sol.iterations[0], cg_residual=sol.residual_norm[0],
                   accepted=search.accepted, fraction=search.fraction, kl=search.kl,
                   objective=search.objective, constraint=search.constraint)
    return search.step, info
