"""The paper's Threshold-Constrained Policy Optimisation as a `jaxroute.learner.Learner`.

Seed Sec. 4 (Algorithm of Si, Lee & Bastani), with the decisions of docs/decisions.md. One
iteration on a batch of rollouts of π_k (`make_update`; `make_learner` samples the batch from
the trace trees first), in named pieces:

1. `kappa_step`: update the threshold on this (fresh) batch with the coverage event of
   (π_k, κ_k), κ ← κ − η_k(err − α)                       (eq. 5, corrected sign; decisions 1–5)
2. `advantages`: V-trace evaluates the softmask policy S̃_{π_k,κ} from rollouts of π_k for two
   streams, the cost (objective, eq. 1) and the terminal correctness (constraint, eq. 2/3).
3. `surrogates` + `policy_step`: g = ∇ cost surrogate, b = ∇ miscoverage surrogate,
   c = D̂_IS(θ_k) − α (the clipped-IS coverage estimate of Sec. 4.1), the Gauss–Newton Fisher of
   mean KL(S̃_k ‖ S̃_θ) (`core.categorical_kl_fvp`), then `core.cpo_step` (eq. 4).
4. `critic_step`: Adam steps on the masked squared error to the V-trace targets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from jaxroute import env, learner
from jaxroute import networks as nets_lib
from jaxroute.core import calibration, cpo, fisher, threshold, vtrace
from jaxroute.errors import InputError
from jaxroute.trace import PackedTrees
from jaxroute.types import Rollout


@dataclasses.dataclass(frozen=True)
class TCPOConfig:
    """The paper's TCPO learner (defaults: seed Sec. 5.1 — α = 0.02, 1000 iterations, batch 5,
    lr 1e-3, κ step 0.1 — else CPO references)."""

    alpha: float = 0.02  # target miscoverage α (seed)
    iterations: int = 1000
    batch_size: int = 5  # episodes sampled per iteration
    hidden: tuple[int, ...] = (64, 64)
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
            raise InputError(f"alpha must be in (0, 1), got {self.alpha}")
        for name in ("max_kl", "softmask_eps", "eta0", "critic_lr", "rho_bar_is"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.damping < 0:
            raise InputError(f"damping must be ≥ 0, got {self.damping}")
        if self.coverage_estimator not in ("exact", "union_bound"):
            raise InputError(f"coverage_estimator: 'exact' or 'union_bound', got "
                             f"{self.coverage_estimator!r}")
        if self.constraint_gradient not in ("advantage", "is"):
            raise InputError(f"constraint_gradient: 'advantage' or 'is', got "
                             f"{self.constraint_gradient!r}")
        if self.coverage_event not in ("verifier", "outcome", "given"):
            raise InputError(f"coverage_event: 'verifier', 'outcome' or 'given', got "
                             f"{self.coverage_event!r}")
        if not 0.0 <= self.constraint_smoothing < 1.0:
            raise InputError(f"constraint_smoothing must be in [0, 1), got {self.constraint_smoothing}")
        if self.target not in ("softmask", "policy"):
            raise InputError(f"target: 'softmask' or 'policy', got {self.target!r}")
        if self.iterations < 0 or self.batch_size < 1:
            raise InputError("iterations ≥ 0 and batch_size ≥ 1 are required")
        if self.cg_iters < 1 or self.critic_steps < 0 or self.backtrack_iters < 1:
            raise InputError("cg_iters and backtrack_iters must be ≥ 1, critic_steps ≥ 0")
        if not 0.0 <= self.kappa_init <= 1.0:
            raise InputError(f"kappa_init must be in [0, 1], got {self.kappa_init}")


@flax.struct.dataclass
class TrainState:
    policy_params: dict
    critic_params: dict  # two critics stacked on a leading axis: [0] cost-to-go, [1] correctness
    critic_opt_state: optax.OptState
    kappa: jax.Array  # () float32
    miscoverage_avg: jax.Array  # () float32, running D̂_IS used for the constraint value c
    step: jax.Array  # () int32, iterations done
    normalizer: nets_lib.Normalizer

    @property
    def params(self) -> dict:
        """The policy parameters (what `learner.fit` returns)."""
        return self.policy_params


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
            raise InputError("coverage_event='given' needs Rollout.covered")
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


def kappa_step(networks, config: TCPOConfig, state: TrainState, batch: Rollout, alpha):
    """Step 1, eq. 5: (κ_{k+1}, the batch's miscoverage under (π_k, κ_k), the step size η_k)."""
    rows = jnp.any(batch.mask, axis=-1)
    covered = coverage_event(networks, config, state, batch)
    err = jnp.sum(jnp.where(rows, ~covered, False)) / jnp.maximum(rows.sum(), 1)
    eta = calibration.step_size(state.step, config.eta0, config.xi)
    return calibration.kappa_update(state.kappa, err, alpha, eta), err, eta


def target_log_probs(config: TCPOConfig, kappa) -> Callable:
    """(logits `[..., K]`, valid) ↦ log of the policy optimised: the softmask S̃_{π,κ} (paper) or
    π itself (`target="policy"`)."""

    def log_q(u, valid):
        log_p = threshold.masked_log_softmax(u, valid)
        if config.target == "policy":
            return log_p
        return threshold.log_softmask(jnp.exp(log_p), kappa, valid, config.softmask_eps)

    return log_q


class Advantages(NamedTuple):
    cost: vtrace.VTraceOutput  # the objective stream (eq. 1)
    correct: vtrace.VTraceOutput  # the constraint stream (eq. 2/3)
    adv_cost: jax.Array  # [B, T] (standardised if configured)


def advantages(networks, config: TCPOConfig, state: TrainState, batch: Rollout, rho):
    """Step 2: V-trace targets and advantages of both streams under the ratios `rho` `[B, T]`
    of the target against the behaviour."""
    mask = batch.mask.astype(bool)
    m = mask.astype(jnp.float32)
    v_cost, v_corr = critic_values(networks, state.critic_params, state.normalizer, batch)
    disc = vtrace.episodic_discounts(mask, config.gamma)
    terminal = vtrace.terminal_indicator(mask)
    success = batch.correct
    if config.coverage_estimator == "exact":
        success = success & ~batch.large_wrong
    r_corr = terminal * success.astype(jnp.float32)[:, None]
    zeros_b = jnp.zeros(mask.shape[0], jnp.float32)
    kw = dict(rho_bar=config.rho_bar, c_bar=config.c_bar, lambda_=config.lambda_)
    vt_cost = vtrace.vtrace_targets(v_cost, zeros_b, batch.cost * m, disc, rho, mask,
                                    pg_rho_bar=config.rho_bar_pg, **kw)
    # CCPO: the constraint gradient is left unclipped.
    vt_corr = vtrace.vtrace_targets(v_corr, zeros_b, r_corr, disc, rho, mask,
                                    pg_rho_bar=jnp.inf, **kw)
    adv_cost = vt_cost.pg_advantage
    if config.standardize_cost_advantage:
        adv_cost = _masked_standardize(adv_cost, m)
    return Advantages(vt_cost, vt_corr, adv_cost)


def critic_values(networks, critic_params, normalizer, batch: Rollout) -> jax.Array:
    """`[2, B, T]`: the cost-to-go and correctness critics in one batched pass."""
    return jax.vmap(networks.value, in_axes=(0, None, None, None))(
        critic_params, normalizer, batch.obs, batch.model)


class Surrogates(NamedTuple):
    """Functions of the flat policy parameters θ, all per-episode sums averaged over episodes."""

    log_q: Callable  # θ ↦ log S̃_θ `[B, T, K]`
    objective: Callable  # θ ↦ cost surrogate
    constraint: Callable  # θ ↦ miscoverage surrogate (its gradient is b)
    miscoverage_is: Callable  # θ ↦ D̂_IS (the constraint value, Sec. 4.1)
    mean_kl: Callable  # θ ↦ mean KL(S̃_k ‖ S̃_θ)


def surrogates(logits_of, log_q_of_logits, config: TCPOConfig, batch: Rollout, log_q_k_all,
               adv: Advantages) -> Surrogates:
    """Step 3's functions of θ, around the batch and the fixed S̃_k (`log_q_k_all`)."""
    mask = batch.mask.astype(bool)
    m = mask.astype(jnp.float32)
    rows = jnp.any(mask, axis=-1)
    n_rows = jnp.maximum(rows.sum(), 1).astype(jnp.float32)
    valid = threshold.valid_actions(batch.model, log_q_k_all.shape[-1])
    log_q_k = _take(log_q_k_all, batch.action)

    def log_q(flat):
        return log_q_of_logits(logits_of(flat), valid)

    def ratio(flat):
        return jnp.exp(jnp.where(mask, _take(log_q(flat), batch.action) - log_q_k, 0.0))

    def objective(flat):
        return jnp.sum(m * ratio(flat) * adv.adv_cost) / n_rows

    def miscoverage_is(flat):
        log_w = threshold.log_clipped_weights(_take(log_q(flat), batch.action),
                                              batch.log_behaviour, mask, config.rho_bar_is)
        log_w = jnp.where(rows, log_w, -jnp.inf)
        cov = threshold.coverage_estimate(log_w, batch.correct & rows, batch.large_wrong & rows,
                                          config.coverage_estimator)
        return 1.0 - cov * mask.shape[0] / n_rows

    def constraint(flat):
        if config.constraint_gradient == "is":
            return miscoverage_is(flat)
        return -jnp.sum(m * ratio(flat) * adv.correct.pg_advantage) / n_rows

    def mean_kl(flat):
        kl = fisher.categorical_kl(log_q_k_all, log_q(flat))
        return jnp.sum(m * kl) / jnp.maximum(m.sum(), 1.0)

    return Surrogates(log_q, objective, constraint, miscoverage_is, mean_kl)


def policy_step(networks, config: TCPOConfig, state: TrainState, batch: Rollout, kappa, alpha):
    """Steps 2–3: the CPO step of eq. 4 on the softmask surrogates. Returns (new policy
    parameters, the V-trace streams (for the critics), D̂ as used (smoothed), D̂ of this batch,
    c, the old objective and constraint, `CPOInfo`)."""
    mask = batch.mask.astype(bool)
    m = mask.astype(jnp.float32)
    valid = threshold.valid_actions(batch.model, networks.num_models)
    flat_k, unravel = fisher.flatten(state.policy_params)

    def logits_of(flat):
        return networks.logits(unravel(flat), state.normalizer, batch.obs, batch.model)

    log_q_of_logits = target_log_probs(config, kappa)
    logits_k = logits_of(flat_k)
    log_q_k_all = jax.lax.stop_gradient(log_q_of_logits(logits_k, valid))
    log_rho = jnp.where(mask, _take(log_q_k_all, batch.action) - batch.log_behaviour, 0.0)
    adv = advantages(networks, config, state, batch, jnp.exp(jnp.minimum(log_rho, 30.0)))
    sur = surrogates(logits_of, log_q_of_logits, config, batch, log_q_k_all, adv)
    g = jax.grad(sur.objective)(flat_k)
    b = jax.grad(sur.constraint)(flat_k)
    d_hat = sur.miscoverage_is(flat_k)
    # A batch of 5 episodes gives a very noisy D̂; CPO's case selection (feasible or recovery)
    # on it would flip at random. Smooth it across iterations (0 = no smoothing).
    d_avg = jnp.where(state.miscoverage_avg < 0, d_hat,
                      config.constraint_smoothing * state.miscoverage_avg
                      + (1.0 - config.constraint_smoothing) * d_hat)
    c = d_avg - alpha
    # Fisher of mean KL(S̃_k ‖ S̃_θ), weighted like the mean (decision 13).
    fvp = fisher.categorical_kl_fvp(logits_of, flat_k, logits_k, log_q_k_all, valid,
                                    m / jnp.maximum(m.sum(), 1.0), log_q_of_logits)
    obj_old, con_old = sur.objective(flat_k), sur.constraint(flat_k)
    step, info = cpo.cpo_step(
        g, b, c, fvp,
        lambda x: (sur.mean_kl(flat_k + x), sur.objective(flat_k + x), sur.constraint(flat_k + x)),
        max_kl=config.max_kl, damping=config.damping, cg_iters=config.cg_iters,
        cg_tol=config.cg_tol, objective_old=obj_old, constraint_old=con_old,
        backtrack_coeff=config.backtrack_coeff, backtrack_iters=config.backtrack_iters)
    finite = jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(b)) & jnp.isfinite(c)
    return unravel(flat_k + step), adv, d_avg, d_hat, c, obj_old, con_old, info, finite


def critic_step(networks, config: TCPOConfig, state: TrainState, batch: Rollout,
                adv: Advantages):
    """Step 4: `critic_steps` Adam steps on the masked squared error to the V-trace targets.
    Returns (critic params, optimiser state, per-critic loss `[2]`)."""
    m = batch.mask.astype(jnp.float32)
    targets = jnp.stack([adv.cost.vs, adv.correct.vs])
    denom = jnp.maximum(m.sum(), 1.0)
    opt = optax.adam(config.critic_lr)

    def loss(params):
        values = critic_values(networks, params, state.normalizer, batch)
        per_critic = jnp.sum(m[None] * (values - targets) ** 2, axis=(1, 2)) / denom
        return 0.5 * jnp.sum(per_critic), per_critic

    def one(carry, _):
        params, opt_state = carry
        (_, per_critic), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), per_critic

    (critics, opt_state), losses = jax.lax.scan(
        one, (state.critic_params, state.critic_opt_state), None, length=config.critic_steps)
    losses = losses[-1] if config.critic_steps else loss(critics)[1]
    return critics, opt_state, losses


def update_fn(networks, config: TCPOConfig):
    """The unjitted `update(state, batch, key, alpha) -> (state, metrics)` (steps 1–4)."""

    def update(state: TrainState, batch: Rollout, key: jax.Array, alpha):
        del key  # The iteration is deterministic given the batch; the key keeps the API stable.
        mask = batch.mask.astype(bool)
        m = mask.astype(jnp.float32)
        rows = jnp.any(mask, axis=-1)
        n_rows = jnp.maximum(rows.sum(), 1).astype(jnp.float32)
        kappa, err, eta = kappa_step(networks, config, state, batch, alpha)
        policy, adv, d_avg, d_hat, c, obj_old, con_old, info, finite = policy_step(
            networks, config, state, batch, kappa, alpha)
        critics, opt_state, losses = critic_step(networks, config, state, batch, adv)
        new_state = state.replace(policy_params=policy, critic_params=critics,
                                  critic_opt_state=opt_state, kappa=kappa, miscoverage_avg=d_avg,
                                  step=state.step + 1)
        escalated = jnp.any(mask & (batch.action > batch.model), axis=-1)
        metrics = {f"cpo_{k}": v for k, v in info._asdict().items()}
        metrics.update(
            kappa=kappa, eta=eta, miscoverage=err, miscoverage_is=d_hat, constraint_c=c,
            objective_old=obj_old, constraint_old=con_old,
            critic_loss_cost=losses[0], critic_loss_corr=losses[1],
            batch_cost=jnp.sum(batch.cost * m) / n_rows,
            batch_correct=jnp.sum(batch.correct & rows) / n_rows,
            batch_escalated=jnp.sum(escalated & rows) / n_rows, nonfinite=~finite)
        return new_state, metrics

    return update


def make_update(networks: nets_lib.RouterNetworks, config: TCPOConfig):
    """The jitted `update(state, batch, key) -> (state, metrics)` on a batch of rollouts, at the
    config's α."""
    update = update_fn(networks, config)
    return jax.jit(lambda state, batch, key: update(state, batch, key, config.alpha))


class Data(NamedTuple):
    """What the TCPO learner samples from: the train trees on the device and the normaliser."""

    trees: PackedTrees
    normalizer: nets_lib.Normalizer
    alpha: jax.Array  # ()


@functools.lru_cache(maxsize=32)
def make_learner(config: TCPOConfig, num_models: int, num_features: int) -> learner.Learner:
    """TCPO as a `Learner`: each update samples `batch_size` problems (and a root each) and rolls
    π_k out on the trees, then runs steps 1–4. With `coverage_event="given"` the coverage of
    Γ_{π_k,κ_k} is replayed exactly on the same problems (eq. 6 on the trees). α comes with the
    data (configs that differ only in α share one compiled program)."""
    # α comes with the data and the length is the loop's: configs that differ only in them
    # share one learner, so one compiled program.
    if config.alpha != TCPOConfig.alpha or config.iterations != TCPOConfig.iterations:
        return make_learner(dataclasses.replace(config, alpha=TCPOConfig.alpha,
                                                iterations=TCPOConfig.iterations),
                            num_models, num_features)
    networks = nets_lib.make_networks(num_models, num_features, config.hidden)
    step = update_fn(networks, config)
    b = config.batch_size
    given = config.coverage_event == "given"

    def update(state: TrainState, data: Data, key):
        trees = data.trees
        k_prob, k_root, k_act, k_upd = jax.random.split(key, 4)
        problems = jax.random.randint(k_prob, (b,), 0, trees.num_roots.shape[0])
        roots = jnp.floor(jax.random.uniform(k_root, (b,)) * trees.num_roots[problems])
        roots = roots.astype(jnp.int32)
        log_prob_fn = lambda obs, model: networks.log_probs(  # noqa: E731
            state.policy_params, state.normalizer, obs, model)
        h = env.horizon(trees)
        batch, _ = env.rollout(trees, problems, roots, log_prob_fn, k_act, h)
        if given:  # exact coverage of Γ_{π_k, κ_k} by replaying eq. 6 on the same problems
            greedy = env.greedy_actions(log_prob_fn, env.gather(trees, problems), state.kappa)
            replay = env.walk(trees, problems, roots, greedy, h)
            batch = batch._replace(covered=replay.correct | batch.large_wrong)
        return step(state, batch, k_upd, data.alpha)

    def prepare(trees: PackedTrees, alpha: float) -> Data:
        return Data(env.to_device(trees), learner.fit_normalizer(trees), jnp.float32(alpha))

    return learner.Learner(
        name="tcpo", networks=networks, prepare=prepare,
        init=lambda key, data: init_state(networks, config, key, data.normalizer),
        update=update)
