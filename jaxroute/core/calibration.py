"""Threshold calibration: the online κ rule (the paper's eq. 5), coverage events, final calibration.

Online rule (ABB, https://arxiv.org/abs/2402.01139, in κ-space): κ_{k+1} = κ_k − η_k (err_k − α),
the paper's sign reversed (decision 1); step sizes decision 2, bounds decision 3, the coverage
event decision 4. Final calibration by conformal risk control: decision 17.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxroute.core import threshold


def step_size(step: jax.Array, eta0: float = 0.1, xi: float | None = 0.1) -> jax.Array:
    """η_k = η₀·(k+1)^{−(1/2+ξ)} (Σ η = ∞, Σ η² < ∞ for ξ ∈ (0, 1/2)); constant η₀ if ξ is None."""
    if xi is None:
        return jnp.asarray(eta0, jnp.float32)
    return eta0 * (step.astype(jnp.float32) + 1.0) ** (-(0.5 + xi))


def kappa_update(
    kappa: jax.Array, miscoverage: jax.Array, alpha: float, eta: jax.Array,
    lo: float = -1.0, hi: float = 2.0,
) -> jax.Array:
    """κ ← κ − η (err − α) (decision 1). `miscoverage` is err ∈ [0, 1] (a batch mean is fine).

    The clip [lo, hi] is a wide safety net only; a [0, 1] clip would break ABB's bound
    (decision 3).
    """
    chex.assert_rank([kappa, miscoverage], 0)
    return jnp.clip(kappa - eta * (miscoverage - alpha), lo, hi)


def kappa_update_seed_literal(kappa, miscoverage, alpha, eta, lo=-1.0, hi=2.0):
    """The paper's eq. 5 as printed, κ ← κ + η(err − α). Unstable (decision 1); kept for the
    regression test only."""
    return jnp.clip(kappa + eta * (miscoverage - alpha), lo, hi)


def covered_by_verifier(
    probs: jax.Array,
    kappa: jax.Array,
    model: jax.Array,
    action: jax.Array,
    verifier_ok: jax.Array,
    correct: jax.Array,
    large_wrong: jax.Array,
    mask: jax.Array,
    *,
    strict: bool = True,
) -> jax.Array:
    """The local-verification coverage event of seed Sec. 4.2. `[B]` bool.

    covered_b = R_M(x_b)=0  ∨  R_π(x_b)=1  ∨  ∏_t ok_{b,t},   ok_t = V(o_t, ỹ_t) ∨ Γ(o_t) escalates:
    a step the verifier rejects is forgiven only if the deployed rule Γ (eq. 6) would escalate
    there. Using Γ (π(esc) ≥ κ, no empty-set fallback) keeps the event monotone in κ: lowering κ
    never uncovers a problem.

    Args:
      probs: `[B, T, K]` π(·|o_t) of the policy being calibrated.
      kappa: () threshold.
      model: `[B, T]` int current model at each decision.
      action: `[B, T]` int action taken in the rollout.
      verifier_ok: `[B, T]` bool V(o_t, ỹ_t) for the step under decision.
      correct: `[B]` bool R_π = 1 for the rollout.
      large_wrong: `[B]` bool R_M = 0.
      mask: `[B, T]` bool.
      strict: count R_π = 1 only if every sampled action is the one Γ would take (otherwise the
        rollout's outcome says nothing about Γ's).
    """
    chex.assert_rank([model, action, verifier_ok, mask], 2)
    chex.assert_equal_shape([model, action, verifier_ok, mask])
    chex.assert_rank([correct, large_wrong], 1)
    chex.assert_rank(probs, 3)
    decision = threshold.route(probs, kappa, model)
    ok = verifier_ok | (decision > model) | ~mask
    locally_verified = jnp.all(ok, axis=-1)
    if strict:
        correct = correct & jnp.all((action == decision) | ~mask, axis=-1)
    return large_wrong | correct | locally_verified


def conformal_threshold(
    errors: jax.Array, grid: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Largest κ on `grid` whose calibration risk passes the conformal-risk-control bound.

    κ̂ = max{κ ∈ grid : (Σ_i err'_i(κ) + 1)/(n + 1) ≤ α}, where err' is err made monotone in κ
    (err'_i(κ) = max_{κ' ≤ κ} err_i(κ')). For exchangeable calibration and test problems this gives
    E[err_test(κ̂)] ≤ E[err'_test(κ̂)] ≤ α (Angelopoulos et al. 2022, "Conformal risk control",
    Thm. 1, with losses bounded by 1). The monotone envelope keeps the guarantee when re-routing
    with a larger κ happens to fix a problem. Needs n ≥ 1/α − 1 to be non-trivial.

    Args:
      errors: `[n, G]` in [0, 1], err_i at each grid value (1 = not covered).
      grid: `[G]` increasing thresholds.
      alpha: target miscoverage.

    Returns:
      (κ̂, feasible): if no grid value passes, κ̂ = grid[0] (the most conservative) and
      feasible = False.
    """
    chex.assert_rank(errors, 2)
    chex.assert_rank(grid, 1)
    chex.assert_equal(errors.shape[1], grid.shape[0])
    n = errors.shape[0]
    monotone = jax.lax.cummax(errors.astype(jnp.float32), axis=1)
    risk = (jnp.sum(monotone, axis=0) + 1.0) / (n + 1.0)
    ok = risk <= alpha
    # The monotone risk is non-decreasing in κ, so the passing grid points form a prefix.
    last = jnp.sum(ok) - 1
    feasible = last >= 0
    return jnp.where(feasible, grid[jnp.maximum(last, 0)], grid[0]), feasible


def binomial_cdf(k: jax.Array, n: int, p: float) -> jax.Array:
    """P(Binom(n, p) ≤ k), exactly (a log-space sum of the pmf; no normal approximation).

    Args:
      k: `[G]` counts (integers in [0, n], any float/int dtype).
      n: trials.
      p: success probability in (0, 1).

    Returns:
      `[G]` float32 probabilities.
    """
    j = jnp.arange(n + 1, dtype=jnp.float32)
    logpmf = (jax.scipy.special.gammaln(n + 1.0) - jax.scipy.special.gammaln(j + 1.0)
              - jax.scipy.special.gammaln(n - j + 1.0) + j * jnp.log(p)
              + (n - j) * jnp.log1p(-p))
    upto = j[None, :] <= jnp.asarray(k, jnp.float32)[:, None]  # [G, n+1]
    return jnp.exp(jax.nn.logsumexp(jnp.where(upto, logpmf[None, :], -jnp.inf), axis=1))


def ltt_threshold(
    errors: jax.Array, grid: jax.Array, alpha: float, delta: float, binary: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Largest κ on `grid` certified by Learn-then-Test fixed-sequence testing (PAC).

    For each grid value test H_κ: risk(κ) > α with a binomial p-value on s = Σ_i err'_i(κ)
    (err' the monotone envelope, as in `conformal_threshold`): exact, P(Binom(n, α) ≤ s), for
    losses in {0, 1}; Bentkus' bound, min(1, e·P(Binom(n, α) ≤ ⌈s⌉)), for losses in [0, 1]
    (e.g. a problem's average over several sampled roots). Walk the grid from the safest value
    (grid[0]) and stop at the first p > δ. Then P(risk(κ̂) ≤ α) ≥ 1 − δ over the calibration draw
    (Angelopoulos et al. 2021, "Learn then Test", fixed-sequence testing; Bentkus 2004). Needs
    n ≥ log δ / log(1 − α) for binary losses (`min_calibration_size`).

    Args:
      errors: `[n, G]`, err_i at each grid value (1 = not covered): in {0, 1} if `binary`,
        else in [0, 1].
      grid: `[G]` increasing thresholds.
      alpha: target miscoverage.
      delta: allowed probability that the certified κ̂ has risk above α.
      binary: the losses are {0, 1} (exact p-value) or bounded in [0, 1] (Bentkus).

    Returns:
      (κ̂, feasible): if grid[0] is not certified, κ̂ = grid[0] and feasible = False.
    """
    chex.assert_rank(errors, 2)
    chex.assert_rank(grid, 1)
    chex.assert_equal(errors.shape[1], grid.shape[0])
    n = errors.shape[0]
    counts = jnp.sum(jax.lax.cummax(errors.astype(jnp.float32), axis=1), axis=0)
    if binary:
        p_value = binomial_cdf(counts, n, alpha)
    else:  # a sum of floats: ceil after a float32-rounding allowance, so 3.0000002 counts 3
        p_value = jnp.minimum(1.0, jnp.e * binomial_cdf(jnp.ceil(counts - 1e-4), n, alpha))
    rejected = p_value <= delta
    # Fixed sequence: only the prefix of rejections up to the first acceptance counts.
    prefix = jnp.cumprod(rejected.astype(jnp.int32))
    last = jnp.sum(prefix) - 1
    feasible = last >= 0
    return jnp.where(feasible, grid[jnp.maximum(last, 0)], grid[0]), feasible


def min_calibration_size(alpha: float, delta: float | None = None, binary: bool = True) -> int:
    """The smallest calibration set on which a guarantee at α can certify anything: marginal
    (`conformal_threshold`, δ None) needs (0 + 1)/(n + 1) ≤ α; PAC (`ltt_threshold`) needs a
    zero-error count to reject, (1 − α)^n ≤ δ (Bentkus, for bounded losses: e(1 − α)^n ≤ δ)."""
    import math

    if not 0 < alpha < 1 or (delta is not None and not 0 < delta < 1):
        raise ValueError(f"alpha and delta must be in (0, 1), got {alpha}, {delta}")
    if delta is None:
        return math.ceil(1 / alpha - 1 - 1e-12)
    target = delta if binary else delta / math.e
    return math.ceil(math.log(target) / math.log1p(-alpha) - 1e-12)
