"""The default learner: the paper's CPO step on exact expectations over trace trees
(decisions 66, 67). Read top to bottom, this file is the whole algorithm:

1. **Exact outcomes** (`expected_outcome`). A trace tree holds every sticky policy's outcome, so
   for a *stochastic* policy q(a | node) the expected cost and the probability of a correct
   answer are a dynamic programme over the tree — no sampling, no importance weights, no critics:

       V(s, t) = Σ_a q(a | s, t) · [cost of a + V(next node of a)],   C(s, t) likewise,

   where "continue" moves to step t+1 of segment s (or ends with the segment's answer after its
   last step), an escalation to the largest model ends in a leaf (its cost and outcome), and an
   escalation to an intermediate model enters that model's segment. Children have larger
   segment indices than their parents, so one backward pass evaluates every node; both
   quantities are differentiable in the policy's parameters.
2. **The data** (`prepare`): the whole train split as one batch of instances (problem × root),
   each problem weighing 1 however many roots it has (the calibration's exchangeable unit).
3. **Objective and constraint** (`surrogates`): E[cost] / (mean large-only cost) and
   E[miscoverage] = E[R_M · (1 − P(correct))], exactly, as functions of the flat parameters.
4. **The CPO step** (`cpo_update`, eq. 4): g = ∇ objective, b = ∇ constraint, c = E[miss] − α,
   the trust region on KL(π_k ‖ π_θ) averaged over valid nodes (`core.categorical_kl_fvp`), then
   `core.cpo_step` (dual, direction, line search). `lagrangian_update` is the ablation's
   alternative (decision 70).
5. **One iteration** (`update`): draw the batch (the whole split by default) and take the step.
6. **κ.** The exact learner keeps no online κ (eq. 5 is TCPO's, `jaxroute.tcpo`): the deployed
   κ of eq. 6 is set after training on the calibration split by the one calibration rule of
   every method (`learner.calibrate` → `guarantee.conformal_choice`, decision 68).
7. `make_learner` wires 2–5 into a `learner.Learner`; `learner.fit` runs it for several seeds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxroute import env, learner
from jaxroute import networks as nets_lib
from jaxroute.core import cpo, fisher, threshold
from jaxroute.errors import InputError
from jaxroute.trace import PackedTrees

# ------------------------------------------------------------------------------------------------
# 1. Exact outcomes of a stochastic policy


class Expectation(NamedTuple):
    cost: jax.Array  # [N] expected cost of each instance (problem × root)
    correct: jax.Array  # [N] probability that the routed answer is correct


def expected_outcome(trees: PackedTrees, node_probs: jax.Array, roots: jax.Array) -> Expectation:
    """Exact E[cost] and P(correct) of the policy `node_probs` on each instance.

    One backward scan over steps per model level: every segment of model m is evaluated at once
    (its children, of larger models, already are), so K − 1 scans evaluate every node.

    Args:
      trees: device arrays of the instances' problems, gathered per instance (`env.gather`),
        leading axis N.
      node_probs: `[N, S, T, K]` q(a | node), zero on invalid actions (a below the segment's
        model) and on padding.
      roots: `[N]` int root segment of each instance.
    """
    n, s_n, t_n = trees.step_cost.shape
    k_n = node_probs.shape[-1]
    dtype = node_probs.dtype
    rows = jnp.arange(n)[:, None, None, None]
    model = trees.seg_model  # [N, S]
    length = trees.seg_len  # [N, S]
    child = jnp.maximum(trees.branch_seg, 0)  # [N, S, T, K]
    is_seg = trees.branch_seg >= 0
    child_first_cost = trees.step_cost[rows, child, 0]
    q_cont = jnp.take_along_axis(node_probs, model[:, :, None, None], axis=-1)[..., 0]
    higher = jnp.arange(k_n)[None, None, None] > model[:, :, None, None]
    nxt = jnp.concatenate([trees.step_cost[:, :, 1:], jnp.zeros((n, s_n, 1), dtype)], 2)
    seg_ok = trees.seg_correct.astype(dtype)
    v = jnp.zeros((n, s_n, t_n), dtype)  # cost-to-go, the node's own step paid
    c = jnp.zeros((n, s_n, t_n), dtype)  # probability of ending correct
    for m in reversed(range(k_n - 1)):  # children are of larger models than their parents
        esc_cost = jnp.where(is_seg, child_first_cost + v[rows, child, 0], trees.branch_cost)
        esc_ok = jnp.where(is_seg, c[rows, child, 0], trees.branch_correct.astype(dtype))
        esc_v = jnp.sum(jnp.where(higher, node_probs * esc_cost, 0.0), -1)  # [N, S, T]
        esc_c = jnp.sum(jnp.where(higher, node_probs * esc_ok, 0.0), -1)

        def back(carry, xs):
            v_next, c_next = carry  # of node t+1, [N, S]
            t, q_c, e_v, e_c, nxt_cost = xs
            last = t == length - 1
            cont_v = jnp.where(last, 0.0, nxt_cost + v_next)
            cont_c = jnp.where(last, seg_ok, c_next)
            live = t < length
            v_t = jnp.where(live, q_c * cont_v + e_v, 0.0)
            c_t = jnp.where(live, q_c * cont_c + e_c, 0.0)
            return (v_t, c_t), (v_t, c_t)

        tm = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731 — time-major for the scan
        init = (jnp.zeros((n, s_n), dtype), jnp.zeros((n, s_n), dtype))
        _, (vs, cs) = jax.lax.scan(back, init, (jnp.arange(t_n), tm(q_cont), tm(esc_v),
                                                tm(esc_c), tm(nxt)), reverse=True)
        level = (model == m)[..., None]
        v = jnp.where(level, jnp.moveaxis(vs, 0, 2), v)
        c = jnp.where(level, jnp.moveaxis(cs, 0, 2), c)
    r = jnp.arange(n)
    cost = trees.step_cost[r, roots, 0] + v[r, roots, 0]
    return Expectation(cost=cost, correct=c[r, roots, 0])


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class ExactConfig:
    """The exact-gradient learner (decision 67). Defaults chosen on the routing benchmark
    (`python -m launch.benchmark_routing`, decisions 67–70)."""

    alpha: float = 0.05
    alpha_scale: float = 1.0  # train for E[miss] ≤ alpha_scale·α (calibration then sets κ)
    iterations: int = 30
    optimizer: str = "cpo"  # "cpo": eq. 4 on the exact surrogates | "lagrangian": Adam + dual
    max_kl: float = 0.05  # cpo: trust region δ on mean KL(π_k ‖ π_θ) over valid nodes
    damping: float = 0.1  # cpo: Fisher damping
    cg_iters: int = 10  # cpo
    constraint_tol: float = 0.0  # cpo: line-search slack on E[miss], as a fraction of α
    learning_rate: float = 3e-3  # lagrangian: Adam
    dual_lr: float = 0.5  # lagrangian: step of the multiplier on (E[miss] − α)
    batch_size: int = 0  # problems per iteration; 0 = the whole train split
    hidden: tuple[int, ...] = (64, 64)

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise InputError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.iterations < 0 or self.max_kl <= 0 or self.learning_rate <= 0:
            raise InputError("iterations ≥ 0, max_kl > 0 and learning_rate > 0 are required")
        if self.optimizer not in ("cpo", "lagrangian"):
            raise InputError(f"optimizer: 'cpo' or 'lagrangian', got {self.optimizer!r}")


# ------------------------------------------------------------------------------------------------
# 2. The data


class Batch(NamedTuple):
    """The train instances, gathered: trees `[N, ...]`, root `[N]`, R_M `[N]`, weight `[N]`."""

    sub: PackedTrees
    roots: jax.Array
    large_right: jax.Array
    weights: jax.Array


class Data(NamedTuple):
    """What the exact learner's update reads (`prepare`): the whole train split as one `Batch`,
    the feature normaliser, the cost scale (mean large-only cost) and the target α."""

    full: Batch
    normalizer: nets_lib.Normalizer
    cost_scale: jax.Array  # ()
    alpha: jax.Array  # () the train constraint: alpha_scale · α


def prepare(trees: PackedTrees, alpha: float, *, alpha_scale: float = 1.0) -> Data:
    """The train split (`trees`, already the train subset) as one `Batch` — every instance, each
    problem weighing 1 however many roots it has — with its normaliser, the cost scale and the
    train constraint α·alpha_scale."""
    problems, roots = env.instances(trees, np.arange(trees.num_problems))
    sub = env.gather(env.to_device(trees), jnp.asarray(problems))
    _, inv, counts = np.unique(problems, return_inverse=True, return_counts=True)
    full = Batch(sub, jnp.asarray(roots), jnp.asarray(trees.solo_correct[problems, -1],
                                                      jnp.float32),
                 jnp.asarray(1.0 / counts[inv], jnp.float32))
    cost_scale = float(np.mean(trees.solo_cost[:, -1])) or 1.0
    return Data(full, learner.fit_normalizer(trees), jnp.float32(cost_scale),
                jnp.float32(alpha * alpha_scale))


def sample_batch(full: Batch, key: jax.Array, batch_size: int) -> Batch:
    """`batch_size` instances drawn without replacement (0 or ≥ N: the whole split)."""
    n = full.roots.shape[0]
    if not batch_size or batch_size >= n:
        return full
    pick = jax.random.choice(key, n, (batch_size,), replace=False)
    return jax.tree.map(lambda a: a[pick], full)


# ------------------------------------------------------------------------------------------------
# 3. Objective and constraint


def surrogates(networks, normalizer, unravel, batch: Batch, cost_scale):
    """(logits_of, surrogates, valid): flat θ ↦ node logits, flat θ ↦ (E[cost] / cost_scale,
    E[miscoverage]) over the batch, exactly, and the valid-action mask `[N, S, T, K]`."""
    sub = batch.sub
    model = jnp.broadcast_to(sub.seg_model[..., None], sub.step_cost.shape)
    valid = threshold.valid_actions(model, networks.num_models)
    w = batch.weights / jnp.sum(batch.weights)

    def logits_of(flat):
        return networks.logits(unravel(flat), normalizer, sub.features, model)

    def objective_and_constraint(flat):
        q = jnp.exp(threshold.masked_log_softmax(logits_of(flat), valid)) * valid
        e = expected_outcome(sub, q, batch.roots)
        return (jnp.sum(w * e.cost) / cost_scale,
                jnp.sum(w * batch.large_right * (1.0 - e.correct)))

    return logits_of, objective_and_constraint, valid


# ------------------------------------------------------------------------------------------------
# 4. The CPO step (eq. 4) on the exact surrogates


def cpo_update(networks, normalizer, config: ExactConfig, cost_scale, params, batch: Batch,
               alpha):
    """One CPO step (eq. 4, `core.cpo_step`) whose g, b and c are the exact gradients and value of
    E[cost] and E[miscoverage] — no sampling, no critics — with the trust region on
    KL(π_k ‖ π_θ) averaged over valid nodes (`core.categorical_kl_fvp`, decision 67)."""
    flat_k, unravel = fisher.flatten(params)
    logits_of, objective_and_constraint, valid = surrogates(networks, normalizer, unravel, batch,
                                                            cost_scale)
    sub = batch.sub
    node_valid = jnp.arange(sub.step_cost.shape[2])[None, None] < sub.seg_len[..., None]
    cost_k, miss_k = objective_and_constraint(flat_k)
    g = jax.grad(lambda f: objective_and_constraint(f)[0])(flat_k)
    b = jax.grad(lambda f: objective_and_constraint(f)[1])(flat_k)
    logits_k = logits_of(flat_k)
    logq_k = jax.lax.stop_gradient(threshold.masked_log_softmax(logits_k, valid))
    d = node_valid * batch.weights[:, None, None]
    d = d / jnp.maximum(jnp.sum(d), 1e-30)
    fvp = fisher.categorical_kl_fvp(logits_of, flat_k, logits_k, logq_k, valid, d,
                                    threshold.masked_log_softmax)

    def mean_kl(flat):
        return jnp.sum(d * fisher.categorical_kl(
            logq_k, threshold.masked_log_softmax(logits_of(flat), valid)))

    step, info = cpo.cpo_step(
        g, b, miss_k - alpha, fvp,
        lambda x: (mean_kl(flat_k + x), *objective_and_constraint(flat_k + x)),
        max_kl=config.max_kl, damping=config.damping, cg_iters=config.cg_iters,
        objective_old=cost_k, constraint_old=miss_k, constraint_tol=config.constraint_tol * alpha)
    metrics = dict(cost=cost_k, miss=miss_k, case=info.case, accepted=info.accepted, kl=info.kl,
                   nonfinite=~(jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(b))))
    return unravel(flat_k + step), metrics


def lagrangian_update(networks, normalizer, config: ExactConfig, cost_scale, state: State,
                      batch: Batch, alpha):
    """The ablation's alternative (decision 70): an Adam step on E[cost] + λ(E[miss] − α) and
    dual ascent on λ."""
    flat, unravel = fisher.flatten(state.params)
    _, objective_and_constraint, _ = surrogates(networks, normalizer, unravel, batch,
                                                cost_scale)

    def lagrangian(f):
        cost, miss = objective_and_constraint(f)
        return cost + state.lam * (miss - alpha), (cost, miss)

    (_, (cost, miss)), grad = jax.value_and_grad(lagrangian, has_aux=True)(flat)
    opt = optax.adam(config.learning_rate)
    u, opt_state = opt.update(unravel(grad), state.opt_state, state.params)
    lam = jnp.maximum(0.0, state.lam + config.dual_lr * (miss - alpha))
    return (State(optax.apply_updates(state.params, u), opt_state, lam),
            dict(cost=cost, miss=miss, lam=lam, nonfinite=~jnp.all(jnp.isfinite(grad))))


# ------------------------------------------------------------------------------------------------
# 5. One iteration


class State(NamedTuple):
    params: dict  # policy parameters
    opt_state: optax.OptState  # lagrangian: Adam's state (cpo: unused, empty)
    lam: jax.Array  # () lagrangian: the multiplier (cpo: unused)

    @property
    def kappa(self) -> jax.Array:
        """No online κ (item 6 above): nan."""
        return jnp.float32(jnp.nan)


def init(config: ExactConfig, networks, key: jax.Array, data: Data) -> State:
    del data
    params, _, _ = nets_lib.init_params(networks, key)
    opt_state = (optax.adam(config.learning_rate).init(params)
                 if config.optimizer == "lagrangian" else ())
    return State(params, opt_state, jnp.float32(1.0))


def update(config: ExactConfig, networks, state: State, data: Data, key: jax.Array
           ) -> tuple[State, dict]:
    """One iteration: the batch (the whole train split by default), then the CPO step (or the
    ablation's Lagrangian step)."""
    batch = sample_batch(data.full, key, config.batch_size)
    if config.optimizer == "cpo":
        params, metrics = cpo_update(networks, data.normalizer, config, data.cost_scale,
                                     state.params, batch, data.alpha)
        return state._replace(params=params), metrics
    return lagrangian_update(networks, data.normalizer, config, data.cost_scale, state, batch,
                             data.alpha)


# ------------------------------------------------------------------------------------------------
# 7. As a learner


def make_learner(config: ExactConfig, num_models: int, num_features: int) -> learner.Learner:
    """The exact learner for `config`. α comes with the data and the length is `fit`'s, so
    configs that differ only in them share one learner — one compiled program."""
    shape = dataclasses.replace(config, alpha=ExactConfig.alpha,
                                iterations=ExactConfig.iterations)
    return _make_learner(shape, num_models, num_features)


@functools.lru_cache(maxsize=32)
def _make_learner(config: ExactConfig, num_models: int, num_features: int) -> learner.Learner:
    networks = nets_lib.make_networks(num_models, num_features, config.hidden)
    return learner.Learner(
        name="exact", networks=networks,
        prepare=functools.partial(prepare, alpha_scale=config.alpha_scale),
        init=functools.partial(init, config, networks),
        update=functools.partial(update, config, networks))


def train_objective(trees: PackedTrees, networks, normalizer, params) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Exact (E[cost] / large-only cost, E[miscoverage]) on the train split, per seed `[seeds]`
    of stacked `params`."""
    idx = trees.split_indices("train")
    problems, roots = env.instances(trees, idx)
    sub = env.gather(env.to_device(trees), jnp.asarray(problems))
    _, inv, counts = np.unique(problems, return_inverse=True, return_counts=True)
    w = jnp.asarray(1.0 / counts[inv] / len(counts), jnp.float32)
    large_right = jnp.asarray(trees.solo_correct[problems, -1], jnp.float32)
    model = jnp.broadcast_to(sub.seg_model[..., None], sub.step_cost.shape)
    valid = threshold.valid_actions(model, networks.num_models)

    @jax.jit
    @jax.vmap
    def one(p):
        q = jnp.exp(networks.log_probs(p, normalizer, sub.features, model)) * valid
        e = expected_outcome(sub, q, jnp.asarray(roots))
        return jnp.sum(w * e.cost), jnp.sum(w * large_right * (1.0 - e.correct))

    cost, miss = one(params)
    scale = float(np.mean(trees.solo_cost[idx, -1])) or 1.0
    return np.asarray(cost) / scale, np.asarray(miss)
