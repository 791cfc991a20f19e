"""Exact expectations of a stochastic routing policy over trace trees, and the trainer built on them.

A trace tree holds every sticky policy's outcome, so for a *stochastic* policy q(a | node) the
expected cost and the probability of a correct answer are a dynamic programme over the tree —
no sampling, no importance weights, no critics (decision 66):

    V(s, t) = Σ_a q(a | s, t) · [cost of a + V(next node of a)],   C(s, t) likewise with outcomes,

where "continue" moves to step t+1 of segment s (or ends with the segment's answer after its last
step), an escalation to the largest model ends in a leaf (its cost and outcome), and an
escalation to an intermediate model enters that model's segment. Children always have larger
segment indices than their parents, so one backward pass over segments and steps evaluates every
node. Both quantities are differentiable in the policy's parameters.

`train_exact` minimises E[cost] subject to E[miscoverage] ≤ α on the train split with these
exact gradients (decision 67): by default the paper's CPO step (eq. 4, `core.cpo_step`) with g,
b and c exact, trust region on KL(π_k ‖ π_θ). The deployed rule is still eq. 6 with κ from the
same conformal calibration as every other method (decision 68).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxroute import networks as nets_lib
from jaxroute.core import threshold
from jaxroute.trace import PackedTrees


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


@dataclasses.dataclass(frozen=True)
class ExactConfig:
    """The exact-gradient trainer (decision 67). Defaults chosen on the routing benchmark
    (`python -m launch.benchmark_routing`, decision log 67–70)."""

    alpha: float = 0.05
    alpha_scale: float = 1.0  # train for E[miss] ≤ alpha_scale·α (calibration then sets κ)
    iterations: int = 30
    optimizer: str = "cpo"  # "cpo": eq. 4 on the exact surrogates | "lagrangian": Adam + dual
    max_kl: float = 0.05  # cpo: trust region δ on mean KL(π_k ‖ π_θ) over valid nodes
    damping: float = 0.1  # cpo: Fisher damping
    cg_iters: int = 10  # cpo
    # cpo restarts: further (cg_iters, iterations) runs per seed; the run with the lowest exact
    # train cost at train miscoverage ≤ α is kept (decision 70).
    restarts: tuple[tuple[int, int], ...] = ()
    constraint_tol: float = 0.0  # cpo: line-search slack on E[miss], as a fraction of α
    learning_rate: float = 3e-3  # lagrangian: Adam
    dual_lr: float = 0.5  # lagrangian: step of the multiplier on (E[miss] − α)
    batch_size: int = 0  # problems per iteration; 0 = the whole train split
    hidden: tuple[int, ...] = (64, 64)

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.iterations < 0 or self.max_kl <= 0 or self.learning_rate <= 0:
            raise ValueError("iterations ≥ 0, max_kl > 0 and learning_rate > 0 are required")
        if self.optimizer not in ("cpo", "lagrangian"):
            raise ValueError(f"optimizer: 'cpo' or 'lagrangian', got {self.optimizer!r}")


class Batch(NamedTuple):
    """The train instances, gathered: trees `[N, ...]`, root `[N]`, R_M `[N]`, weight `[N]`."""

    sub: PackedTrees
    roots: jax.Array
    large_right: jax.Array
    weights: jax.Array


def _surrogates(networks, normalizer, flat_unravel, batch: Batch, cost_scale):
    """flat θ ↦ (E[cost] / cost_scale, E[miscoverage]) over the batch, exactly."""
    flat_to_params = flat_unravel
    sub = batch.sub
    model = jnp.broadcast_to(sub.seg_model[..., None], sub.step_cost.shape)
    valid = threshold.valid_actions(model, networks.num_models)
    w = batch.weights / jnp.sum(batch.weights)

    def logits_of(flat):
        return networks.logits(flat_to_params(flat), normalizer, sub.features, model)

    def surrogates(flat):
        q = jnp.exp(threshold.masked_log_softmax(logits_of(flat), valid)) * valid
        e = expected_outcome(sub, q, batch.roots)
        return (jnp.sum(w * e.cost) / cost_scale,
                jnp.sum(w * batch.large_right * (1.0 - e.correct)))

    return logits_of, surrogates, valid


def cpo_update(networks, normalizer, config: ExactConfig, cost_scale: float, params, batch: Batch,
               alpha):
    """One CPO step (eq. 4, `core.cpo_step`) whose g, b and c are the exact gradients and value of
    E[cost] and E[miscoverage] — no sampling, no critics — with the trust region on
    KL(π_k ‖ π_θ) averaged over valid nodes (decision 67)."""
    from jaxroute.core import cpo, fisher

    flat_k, unravel = fisher.flatten(params)
    logits_of, surrogates, valid = _surrogates(networks, normalizer, unravel, batch, cost_scale)
    k_models = networks.num_models
    sub = batch.sub
    node_valid = jnp.arange(sub.step_cost.shape[2])[None, None] < sub.seg_len[..., None]
    cost_k, miss_k = surrogates(flat_k)
    g = jax.grad(lambda f: surrogates(f)[0])(flat_k)
    b = jax.grad(lambda f: surrogates(f)[1])(flat_k)
    logits_k = logits_of(flat_k)
    logq_k = jax.lax.stop_gradient(threshold.masked_log_softmax(logits_k, valid))
    d = node_valid * batch.weights[:, None, None]
    d = d / jnp.maximum(jnp.sum(d), 1e-30)

    def kl_of_logits(u, ref, ok):
        return fisher.categorical_kl(ref, threshold.masked_log_softmax(u, ok))

    flat_rows = lambda x: x.reshape(-1, k_models)  # noqa: E731
    h_u = jax.vmap(jax.hessian(kl_of_logits))(flat_rows(logits_k), flat_rows(logq_k),
                                              flat_rows(valid))
    h_u = h_u.reshape(d.shape + (k_models, k_models)) * d[..., None, None]
    fvp = fisher.make_ggn_fvp(logits_of, flat_k, h_u, damping=0.0)

    def mean_kl(flat):
        return jnp.sum(d * fisher.categorical_kl(
            logq_k, threshold.masked_log_softmax(logits_of(flat), valid)))

    step, info = cpo.cpo_step(
        g, b, miss_k - alpha, fvp, lambda x: (mean_kl(flat_k + x), *surrogates(flat_k + x)),
        max_kl=config.max_kl, damping=config.damping, cg_iters=config.cg_iters,
        objective_old=cost_k, constraint_old=miss_k, constraint_tol=config.constraint_tol * alpha)
    metrics = dict(cost=cost_k, miss=miss_k, case=info.case, accepted=info.accepted, kl=info.kl)
    return unravel(flat_k + step), metrics


def train_batch(trees: PackedTrees) -> tuple[Batch, nets_lib.Normalizer, float]:
    """The train split as one `Batch` (every instance, each problem weighing 1 however many
    roots it has — the calibration's exchangeable unit), its feature normaliser, and the cost
    scale (mean large-only cost)."""
    from jaxroute import env, trainer

    train_idx = trees.split_indices("train")
    if len(train_idx) == 0:
        raise ValueError("no usable problems in the 'train' split")
    problems, roots = env.instances(trees, train_idx)
    sub = env.gather(env.to_device(trees), jnp.asarray(problems))
    _, inv, counts = np.unique(problems, return_inverse=True, return_counts=True)
    full = Batch(sub, jnp.asarray(roots), jnp.asarray(trees.solo_correct[problems, -1],
                                                      jnp.float32),
                 jnp.asarray(1.0 / counts[inv], jnp.float32))
    cost_scale = float(np.mean(trees.solo_cost[train_idx, -1])) or 1.0
    return full, trainer.fit_normalizer(trees.subset(train_idx)), cost_scale


@functools.lru_cache(maxsize=32)
def trainer_fn(config: ExactConfig, num_models: int, num_features: int):
    """The jitted `train(keys [S, 2], alpha, batch, normalizer, cost_scale) -> (params, history)`
    for `config`, vmapped over seeds — cached, so every world of the same shapes reuses one
    compiled program. α is an argument, so it needs no recompilation either."""
    networks = nets_lib.make_networks(num_models, num_features, config.hidden)
    opt = optax.adam(config.learning_rate)
    bsz = config.batch_size

    def train(key, alpha, full: Batch, normalizer, cost_scale):
        n = full.roots.shape[0]

        def sample(k):
            if not bsz or bsz >= n:
                return full
            pick = jax.random.choice(k, n, (bsz,), replace=False)
            return jax.tree.map(lambda a: a[pick], full)

        key, init_key = jax.random.split(key)
        params, _, _ = nets_lib.init_params(networks, init_key)
        if config.optimizer == "cpo":
            def body(carry, k):
                return cpo_update(networks, normalizer, config, cost_scale, carry, sample(k),
                                  alpha)

            return jax.lax.scan(body, params, jax.random.split(key, config.iterations))

        def lagr_body(carry, k):
            p, s, lam = carry
            flat, unravel = ravel_pytree(p)
            _, surrogates, _ = _surrogates(networks, normalizer, unravel, sample(k), cost_scale)

            def lagrangian(f):
                cost, miss = surrogates(f)
                return cost + lam * (miss - alpha), (cost, miss)

            (_, (cost, miss)), grad = jax.value_and_grad(lagrangian, has_aux=True)(flat)
            u, s = opt.update(unravel(grad), s, p)
            lam = jnp.maximum(0.0, lam + config.dual_lr * (miss - alpha))
            return (optax.apply_updates(p, u), s, lam), dict(cost=cost, miss=miss, lam=lam)

        (params, _, _), hist = jax.lax.scan(
            lagr_body, (params, opt.init(params), jnp.float32(1.0)),
            jax.random.split(key, config.iterations))
        return params, hist

    return networks, jax.jit(jax.vmap(train, in_axes=(0, None, None, None, None)))


class ExactResult(NamedTuple):
    networks: nets_lib.RouterNetworks
    normalizer: nets_lib.Normalizer
    params: dict  # policy parameters, stacked on a leading axis: one per seed
    history: dict  # per seed: the kept run's final metrics, its index, every run's objective
    seeds: tuple[int, ...]

    def policy(self, i: int):
        """Seed i's policy parameters."""
        return jax.tree.map(lambda a: a[i], self.params)

    def log_prob_fn(self, i: int):
        params = self.policy(i)
        return lambda o, m: self.networks.log_probs(params, self.normalizer, o, m)


def train_exact(trees: PackedTrees, config: ExactConfig = ExactConfig(),
                seeds: tuple[int, ...] = (0,)) -> ExactResult:
    """Train one router per seed on the train split with exact expectations, the seeds in one
    vmapped, jitted scan per run; with `restarts`, each seed keeps its best run by the exact
    train objective (lowest cost among runs whose train miscoverage is ≤ α). κ is calibrated
    afterwards like every other method's knob."""
    target = jnp.float32(config.alpha * config.alpha_scale)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    runs = [config] + [dataclasses.replace(config, cg_iters=c, iterations=n, restarts=())
                       for c, n in (config.restarts if config.optimizer == "cpo" else ())]
    full, normalizer, cost_scale = train_batch(trees)
    results = []
    for cfg in runs:
        # α is an argument of the compiled trainer: the config's own α must not key the cache.
        networks, train = trainer_fn(dataclasses.replace(cfg, alpha=0.5, alpha_scale=1.0),
                                     trees.num_models, trees.features.shape[-1])
        params, hist = train(keys, target, full, normalizer, jnp.float32(cost_scale))
        history = {k: np.asarray(v) for k, v in hist.items()}
        if not np.all(np.isfinite(history["cost"])):
            raise FloatingPointError("non-finite expected cost during exact training")
        cost, miss = train_objective(trees, networks, normalizer, params)
        results.append((params, history, cost, miss))
    # Per seed: the cheapest run that meets the train constraint (within float tolerance).
    cost = np.stack([r[2] for r in results])  # [runs, seeds]
    miss = np.stack([r[3] for r in results])
    pick = np.argmin(np.where(miss <= float(target) * 1.02 + 1e-6, cost, np.inf), axis=0)
    pick = np.where(np.isfinite(np.min(np.where(miss <= float(target) * 1.02 + 1e-6, cost,
                                                np.inf), axis=0)), pick, 0)
    params = jax.tree.map(lambda *xs: jnp.stack([xs[p][i] for i, p in enumerate(pick)]),
                          *[r[0] for r in results])
    # Per seed, the kept run's final metrics (runs differ in length), its index, and the exact
    # train objective of every run.
    history = {k: np.asarray([results[p][1][k][i][-1] for i, p in enumerate(pick)])
               for k in results[0][1]}
    history.update(run=np.asarray(pick), run_train_cost=cost, run_train_miss=miss)
    return ExactResult(networks, normalizer, params, history, tuple(seeds))


def train_objective(trees: PackedTrees, networks, normalizer, params) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Exact (E[cost] / large-only cost, E[miscoverage]) on the train split, per seed `[seeds]`
    of stacked `params`."""
    from jaxroute import env

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


class ExactFit(NamedTuple):
    result: ExactResult
    kappas: list[float]  # κ per seed, calibrated on the cal split (decision 68)
    feasible: list[bool]


def calibrate_seeds(trees: PackedTrees, result: ExactResult, alpha: float) -> ExactFit:
    """κ for every seed's router by the one calibration rule of every method."""
    from jaxroute import env, evaluate

    dev = env.to_device(trees)
    cal = env.instances(trees, trees.split_indices("cal"))
    kappas, feasible = [], []
    for i in range(len(result.seeds)):
        fam = evaluate.router_family(trees, result.log_prob_fn(i))
        idx, ok, _ = evaluate.calibrate_family(trees, dev, fam, cal, alpha)
        kappas.append(float(fam.grid[idx]))
        feasible.append(ok)
    return ExactFit(result, kappas, feasible)


def train_and_export(trees: PackedTrees, manifest, config: ExactConfig, workdir, *,
                     seeds: tuple[int, ...] = (0,), source: str, cost_model: str,
                     router_dir=None) -> ExactFit:
    """Train one router per seed (`train_exact`), calibrate each κ, record the run in
    `workdir/train_config.json` and export the first seed's router (`export.export_trained`,
    the one export path) to `router_dir` (default `workdir/router`)."""
    from pathlib import Path

    from jaxroute.durable import exclusive

    trees.require_splits("train", "cal", where=source)
    workdir = Path(workdir)
    with exclusive(workdir):
        return _train_and_export(trees, manifest, config, workdir, seeds, source, cost_model,
                                 router_dir)


def _train_and_export(trees, manifest, config, workdir, seeds, source, cost_model,
                      router_dir) -> ExactFit:
    import json
    from pathlib import Path

    from jaxroute import export
    from jaxroute.durable import atomic_write_text

    record = {"trainer": "exact", "config": dataclasses.asdict(config), "seeds": list(seeds),
              "source": source, "cost_model": cost_model}
    atomic_write_text(workdir / "train_config.json", json.dumps(record, indent=2) + "\n")
    fit = calibrate_seeds(trees, train_exact(trees, config, seeds), config.alpha)
    export.export_trained(
        Path(router_dir) if router_dir else workdir / "router", networks=fit.result.networks,
        policy_params=fit.result.policy(0), normalizer=fit.result.normalizer,
        kappa=fit.kappas[0], manifest=manifest, alpha=config.alpha, hidden=config.hidden,
        train_config={"trainer": "exact", **dataclasses.asdict(config), "seed": seeds[0]},
        extra={"calibration_feasible": fit.feasible[0], "cost_model": cost_model,
               "source": source})
    return fit


def config_from_dict(d: dict) -> ExactConfig:
    """Inverse of `dataclasses.asdict(ExactConfig)` (e.g. a run's train_config.json)."""
    try:
        return ExactConfig(**{**d, "hidden": tuple(int(h) for h in d["hidden"]),
                              "restarts": tuple(tuple(r) for r in d.get("restarts", ()))})
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an ExactConfig: {e}") from None
