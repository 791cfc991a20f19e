"""One Threshold-Constrained Policy Optimisation iteration: `update(state, batch, key)`.

Seed Sec. 4 (Algorithm of Si, Lee & Bastani), with the decisions of docs/decisions.md:

1. κ: update the threshold on this (fresh) batch with the coverage event of (π_k, κ_k),
   κ ← κ − η_k(err − α)                                   (eq. 5, corrected sign; decisions 1–5)
2. V-trace: evaluate the softmask policy S̃_{π_k,κ} from rollouts of π_k for two streams,
   the cost (objective, eq. 1) and the terminal correctness (constraint, eq. 2/3).
3. CPO: assemble g = ∇ cost surrogate, b = ∇ miscoverage surrogate, c = D̂_IS(θ_k) − α (the
   clipped-IS coverage estimate of Sec. 4.1) and the Gauss–Newton Fisher of mean
   KL(S̃_k ‖ S̃_θ), then call `core.cpo_step` (eq. 4).
4. Critics: Adam steps on the masked squared error to the V-trace targets.

`make_update(networks, config)` returns the update jitted as a whole.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import optax

from jaxroute import networks as nets_lib
from jaxroute.core import calibration, cpo, fisher, threshold, vtrace
from jaxroute.types import Rollout


@dataclasses.dataclass(frozen=True)
class TCPOConfig:
    """Hyper-parameters of one TCPO iteration (defaults: seed Sec. 5.1, else CPO references)."""

    alpha: float = 0.02  # target miscoverage α (seed)
    max_kl: float = 0.01  # trust region δ on mean KL(S̃_k ‖ S̃_θ) (CPO/CCPO)
    damping: float = 0.1  # Fisher damping (starter-agents, omnisafe)
    cg_iters: int = 10
    cg_tol: float = 1e-10
    softmask_eps: float = 0.01  # ε of the sigmoid softmask (CCPO)
    target: str = "softmask"  # policy optimised: "softmask" S̃_{π,κ} (paper) | "policy" π itself
    rho_bar: float = 1.0  # V-trace value-target clip ρ̄ (CCPO)
    c_bar: float = 1.0  # V-trace trace clip c̄
    rho_bar_pg: float = 1.0  # clip on the objective's policy-gradient ratio
    rho_bar_is: float = 2.0  # clip in the coverage importance-weight product (seed Sec. 4.1)
    gamma: float = 1.0
    lambda_: float = 1.0
    coverage_estimator: str = "exact"  # "exact" | "union_bound"
    constraint_gradient: str = "advantage"  # "advantage" (V-trace) | "is" (autodiff of D̂_IS)
    coverage_event: str = "verifier"  # "verifier" (Sec. 4.2) | "outcome" (eq. 5) | "given"
    strict_coverage: bool = True  # R_π counts only if every sampled action is Γ's (eq. 6)
    standardize_cost_advantage: bool = True
    constraint_smoothing: float = 0.0  # EMA factor for D̂_IS across iterations (0 = per batch)
    kappa_init: float = 0.5
    eta0: float = 0.1  # κ step size (seed: 0.1)
    xi: float | None = 0.1  # η_k = η₀(k+1)^{-(1/2+ξ)}; None for a constant step
    critic_lr: float = 1e-3  # seed: learning rate 1e-3
    critic_steps: int = 10
    backtrack_coeff: float = 0.8
    backtrack_iters: int = 10

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        for name in ("max_kl", "softmask_eps", "eta0", "critic_lr", "rho_bar_is"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {self.damping}")
        if self.coverage_estimator not in ("exact", "union_bound"):
            raise ValueError(f"coverage_estimator: 'exact' or 'union_bound', got "
                             f"{self.coverage_estimator!r}")
        if self.constraint_gradient not in ("advantage", "is"):
            raise ValueError(f"constraint_gradient: 'advantage' or 'is', got "
                             f"{self.constraint_gradient!r}")
        if self.coverage_event not in ("verifier", "outcome", "given"):
            raise ValueError(f"coverage_event: 'verifier', 'outcome' or 'given', got "
                             f"{self.coverage_event!r}")
        if not 0.0 <= self.constraint_smoothing < 1.0:
            raise ValueError(f"constraint_smoothing must be in [0, 1), got {self.constraint_smoothing}")
        if self.target not in ("softmask", "policy"):
            raise ValueError(f"target: 'softmask' or 'policy', got {self.target!r}")
        if self.cg_iters < 1 or self.critic_steps < 0 or self.backtrack_iters < 1:
            raise ValueError("cg_iters and backtrack_iters must be ≥ 1, critic_steps ≥ 0")
        if not 0.0 <= self.kappa_init <= 1.0:
            raise ValueError(f"kappa_init must be in [0, 1], got {self.kappa_init}")


@flax.struct.dataclass
class TrainState:
    policy_params: dict
    critic_params: dict  # two critics stacked on a leading axis: [0] cost-to-go, [1] correctness
    critic_opt_state: optax.OptState
    kappa: jax.Array  # () float32
    miscoverage_avg: jax.Array  # () float32, running D̂_IS used for the constraint value c
    step: jax.Array  # () int32, iterations done
    normalizer: nets_lib.Normalizer


def init_state(
    networks: nets_lib.RouterNetworks,
    config: TCPOConfig,
    key: jax.Array,
    normalizer: nets_lib.Normalizer | None = None,
) -> TrainState:
    policy, cost, corr = nets_lib.init_params(networks, key)
    critics = jax.tree.map(lambda a, b: jnp.stack([a, b]), cost, corr)
    opt = optax.adam(config.critic_lr)
    return TrainState(
        policy_params=policy,
        critic_params=critics,
        critic_opt_state=opt.init(critics),
        kappa=jnp.asarray(config.kappa_init, jnp.float32),
        miscoverage_avg=jnp.asarray(-1.0, jnp.float32),  # < 0: no estimate yet
        step=jnp.asarray(0, jnp.int32),
        normalizer=normalizer or nets_lib.Normalizer.identity(networks.num_features),
    )


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _masked_standardize(x, m):
    n = jnp.maximum(m.sum(), 1.0)
    mean = (x * m).sum() / n
    std = jnp.sqrt(((x - mean) ** 2 * m).sum() / n)
    return jnp.where(m > 0, (x - mean) / jnp.maximum(std, 1e-8), 0.0)


def coverage_event(networks, config: TCPOConfig, state: TrainState, batch: Rollout) -> jax.Array:
    """`[B]` bool coverage of the current (π, κ) on `batch`, per `config.coverage_event`."""
    if config.coverage_event == "given":
        if batch.covered is None:
            raise ValueError("coverage_event='given' needs Rollout.covered")
        return batch.covered.astype(bool)
    probs = jnp.exp(networks.log_probs(state.policy_params, state.normalizer, batch.obs,
                                       batch.model))
    if config.coverage_event == "verifier":
        return calibration.covered_by_verifier(
            probs, state.kappa, batch.model, batch.action, batch.verifier_ok, batch.correct,
            batch.large_wrong, batch.mask, strict=config.strict_coverage)
    # "outcome": eq. 5 with the rollout's own outcome standing in for R_Π.
    correct = batch.correct
    if config.strict_coverage:
        decision = threshold.route(probs, state.kappa, batch.model)
        correct = correct & jnp.all((batch.action == decision) | ~batch.mask, axis=-1)
    return correct | batch.large_wrong


def make_update(networks: nets_lib.RouterNetworks, config: TCPOConfig):
    """Build the jitted `update(state, batch, key) -> (state, metrics)`."""
    critic_opt = optax.adam(config.critic_lr)
    k_models = networks.num_models

    def update(state: TrainState, batch: Rollout, key: jax.Array):
        del key  # The iteration is deterministic given the batch; the key keeps the API stable.
        mask = batch.mask.astype(bool)
        m = mask.astype(jnp.float32)
        rows = jnp.any(mask, axis=-1)
        n_rows = jnp.maximum(rows.sum(), 1).astype(jnp.float32)
        valid = threshold.valid_actions(batch.model, k_models)

        # 1. κ from the coverage of (π_k, κ_k) on this fresh batch.
        covered = coverage_event(networks, config, state, batch)
        err = jnp.sum(jnp.where(rows, ~covered, False)) / n_rows
        eta = calibration.step_size(state.step, config.eta0, config.xi)
        kappa = calibration.kappa_update(state.kappa, err, config.alpha, eta)

        # 2. The softmask target S̃_{π_k, κ} and the V-trace ratios against the behaviour.
        flat_k, unravel = fisher.flatten(state.policy_params)

        def logits_of(flat):
            return networks.logits(unravel(flat), state.normalizer, batch.obs, batch.model)

        def log_s_of_logits(u, valid):
            log_p = threshold.masked_log_softmax(u, valid)
            if config.target == "policy":
                return log_p
            return threshold.log_softmask(jnp.exp(log_p), kappa, valid, config.softmask_eps)

        def log_s_all(flat):
            return log_s_of_logits(logits_of(flat), valid)

        logits_k = logits_of(flat_k)
        log_s_k_all = jax.lax.stop_gradient(log_s_of_logits(logits_k, valid))
        log_s_k = _take(log_s_k_all, batch.action)
        log_rho = jnp.where(mask, log_s_k - batch.log_behaviour, 0.0)
        rho_raw = jnp.exp(jnp.minimum(log_rho, 30.0))

        def critic_values(params):  # [2, B, T]; one batched pass for both critics
            return jax.vmap(networks.value, in_axes=(0, None, None, None))(
                params, state.normalizer, batch.obs, batch.model)

        v_cost, v_corr = critic_values(state.critic_params)
        disc = vtrace.episodic_discounts(mask, config.gamma)
        terminal = vtrace.terminal_indicator(mask)
        success = batch.correct
        if config.coverage_estimator == "exact":
            success = success & ~batch.large_wrong
        r_corr = terminal * success.astype(jnp.float32)[:, None]
        zeros_b = jnp.zeros(mask.shape[0], jnp.float32)
        vt_kw = dict(rho_bar=config.rho_bar, c_bar=config.c_bar, lambda_=config.lambda_)
        vt_cost = vtrace.vtrace_targets(v_cost, zeros_b, batch.cost * m, disc, rho_raw, mask,
                                pg_rho_bar=config.rho_bar_pg, **vt_kw)
        # CCPO: the constraint gradient is left unclipped.
        vt_corr = vtrace.vtrace_targets(v_corr, zeros_b, r_corr, disc, rho_raw, mask,
                                pg_rho_bar=jnp.inf, **vt_kw)
        adv_cost = vt_cost.pg_advantage
        if config.standardize_cost_advantage:
            adv_cost = _masked_standardize(adv_cost, m)
        adv_corr = vt_corr.pg_advantage

        # 3. Surrogates of θ (flat), all per-episode sums averaged over episodes.
        def ratio(flat):
            return jnp.exp(jnp.where(mask, _take(log_s_all(flat), batch.action) - log_s_k, 0.0))

        def objective(flat):
            return jnp.sum(m * ratio(flat) * adv_cost) / n_rows

        def miscoverage_is(flat):
            log_w = threshold.log_clipped_weights(
                _take(log_s_all(flat), batch.action), batch.log_behaviour, mask,
                config.rho_bar_is)
            log_w = jnp.where(rows, log_w, -jnp.inf)
            cov = threshold.coverage_estimate(log_w, batch.correct & rows,
                                              batch.large_wrong & rows,
                                              config.coverage_estimator)
            return 1.0 - cov * mask.shape[0] / n_rows

        def constraint(flat):
            if config.constraint_gradient == "is":
                return miscoverage_is(flat)
            return -jnp.sum(m * ratio(flat) * adv_corr) / n_rows

        def mean_kl(flat):
            kl = fisher.categorical_kl(log_s_k_all, log_s_all(flat))
            return jnp.sum(m * kl) / jnp.maximum(m.sum(), 1.0)

        g = jax.grad(objective)(flat_k)
        b = jax.grad(constraint)(flat_k)
        d_hat = miscoverage_is(flat_k)
        # A batch of 5 episodes gives a very noisy D̂; CPO's case selection (feasible or
        # recovery) on it would flip at random. Smooth it across iterations (0 = no smoothing).
        d_avg = jnp.where(state.miscoverage_avg < 0, d_hat,
                          config.constraint_smoothing * state.miscoverage_avg
                          + (1.0 - config.constraint_smoothing) * d_hat)
        c = d_avg - config.alpha

        # Fisher of mean KL(S̃_k ‖ S̃_θ) in Gauss–Newton form: per-decision K×K Hessians in logit
        # space, weighted like the mean (decision 13).
        def kl_of_logits(u, ref, valid):
            return fisher.categorical_kl(ref, log_s_of_logits(u, valid))

        flat_rows = lambda x: x.reshape(-1, k_models)  # noqa: E731
        h_u = jax.vmap(jax.hessian(kl_of_logits))(
            flat_rows(logits_k), flat_rows(log_s_k_all), flat_rows(valid))
        h_u = h_u.reshape(mask.shape + (k_models, k_models))
        h_u = h_u * (m / jnp.maximum(m.sum(), 1.0))[..., None, None]
        fvp = fisher.make_ggn_fvp(logits_of, flat_k, h_u, damping=0.0)
        obj_old, con_old = objective(flat_k), constraint(flat_k)
        step, info = cpo.cpo_step(
            g, b, c, fvp,
            lambda x: (mean_kl(flat_k + x), objective(flat_k + x), constraint(flat_k + x)),
            max_kl=config.max_kl, damping=config.damping, cg_iters=config.cg_iters,
            cg_tol=config.cg_tol, objective_old=obj_old, constraint_old=con_old,
            backtrack_coeff=config.backtrack_coeff, backtrack_iters=config.backtrack_iters)
        new_policy = unravel(flat_k + step)

        # 4. Critics: Adam on the masked squared error to the V-trace targets.
        targets = jnp.stack([vt_cost.vs, vt_corr.vs])
        denom = jnp.maximum(m.sum(), 1.0)

        def critic_loss(params):
            per_critic = jnp.sum(m[None] * (critic_values(params) - targets) ** 2, axis=(1, 2)) / denom
            return 0.5 * jnp.sum(per_critic), per_critic

        def critic_step(carry, _):
            params, opt_state = carry
            (_, per_critic), grads = jax.value_and_grad(critic_loss, has_aux=True)(params)
            updates, opt_state = critic_opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), per_critic

        (critics, opt_state), losses = jax.lax.scan(
            critic_step, (state.critic_params, state.critic_opt_state), None,
            length=config.critic_steps)
        losses = losses[-1] if config.critic_steps else critic_loss(critics)[1]

        new_state = state.replace(
            policy_params=new_policy,
            critic_params=critics,
            critic_opt_state=opt_state,
            kappa=kappa,
            miscoverage_avg=d_avg,
            step=state.step + 1,
        )
        escalated = jnp.any(mask & (batch.action > batch.model), axis=-1)
        metrics = dict(
            kappa=kappa,
            eta=eta,
            miscoverage=err,
            miscoverage_is=d_hat,
            constraint_c=c,
            cpo_case=info.case,
            cpo_lambda=info.lam,
            cpo_nu=info.nu,
            cpo_q=info.q,
            cpo_r=info.r,
            cpo_s=info.s,
            step_accepted=info.accepted,
            step_fraction=info.fraction,
            kl=info.kl,
            objective_old=obj_old,
            objective_new=info.objective,
            constraint_old=con_old,
            constraint_new=info.constraint,
            cg_iterations=info.cg_iterations,
            cg_residual=info.cg_residual,
            critic_loss_cost=losses[0],
            critic_loss_corr=losses[1],
            batch_cost=jnp.sum(batch.cost * m) / n_rows,
            batch_correct=jnp.sum(batch.correct & rows) / n_rows,
            batch_escalated=jnp.sum(escalated & rows) / n_rows,
            nonfinite=~(jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(b))
                        & jnp.isfinite(c)),
        )
        return new_state, metrics

    return jax.jit(update)
