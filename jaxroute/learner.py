"""The learner interface both trainers implement, the one training loop, and its one result.

A `Learner` is a set of pure functions in the spirit of optax's `GradientTransformation` and
brax's training loops (decision 82):

    data = learner.prepare(train_trees, alpha)           # device arrays the update reads
    state = learner.init(key, data)
    state, metrics = learner.update(state, data, key)     # one iteration, jittable

Two learners implement it: `jaxroute.exact.make_learner` (the default: CPO on exact tree
expectations, decision 67) and `jaxroute.tcpo.make_learner` (the paper's sampled TCPO). `fit`
runs any of them for several seeds at once (one `vmap`, one jitted `lax.scan` per chunk of
iterations; iteration i's key is `fold_in(seed key, i)`, so a run resumed from a checkpoint or
extended gives the numbers of an uninterrupted one), with orbax checkpoints when a workdir is
given. `calibrate` then sets each seed's κ by the one conformal rule of every method
(decision 68). Both learners return the same `TrainResult`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxroute import env, guarantee
from jaxroute import networks as nets_lib
from jaxroute.core import threshold
from jaxroute.errors import InputError
from jaxroute.trace import PackedTrees


class Learner(NamedTuple):
    """A routing-policy learner: pure functions over a state pytree (decision 82), as small as
    optax's `GradientTransformation` plus the data it reads.

    - `prepare(trees, alpha) -> data`: the train split's packed trees (host) as the pytree of
      device arrays the update reads; `data.normalizer` is the feature normaliser fitted on them.
    - `init(key, data) -> state`; a state has `params` (the policy parameters) and `kappa` (the
      learner's online κ, nan when it keeps none).
    - `update(state, data, key) -> (state, metrics)`: one iteration; metrics are scalars, with
      `nonfinite` (bool) where the iteration saw a non-finite gradient.
    """

    name: str
    networks: nets_lib.RouterNetworks
    prepare: Callable[[PackedTrees, float], Any]
    init: Callable[[jax.Array, Any], Any]
    update: Callable[[Any, Any, jax.Array], tuple[Any, dict]]


class TrainResult(NamedTuple):
    """A trained router per seed; leading axis of `params`, `kappa_online` and `history`: seeds."""

    learner: str
    networks: nets_lib.RouterNetworks
    normalizer: nets_lib.Normalizer
    params: Any  # policy parameters stacked on a leading seed axis
    kappa_online: np.ndarray  # [S] the learner's own κ at the end (nan for exact CPO)
    history: dict[str, np.ndarray]  # [S, iterations] per-iteration metrics
    seeds: tuple[int, ...]
    kappas: tuple[float, ...] = ()  # [S] κ calibrated on the cal split (`calibrate`)
    feasible: tuple[bool, ...] = ()
    calibration_problems: int = 0  # problems κ was calibrated on (`calibrate`)

    def policy(self, i: int = 0):
        """Seed i's policy parameters."""
        return jax.tree.map(lambda a: a[i], self.params)

    def log_prob_fn(self, i: int = 0) -> Callable:
        """Seed i's `log π(·|o)` as `(features [..., D], model [...]) -> [..., K]`."""
        params = self.policy(i)
        return lambda o, m: self.networks.log_probs(params, self.normalizer, o, m)

    @property
    def kappa(self) -> float:
        """The first seed's deployed κ (calibrated if `calibrate` ran, else its online κ)."""
        return float(self.kappas[0]) if self.kappas else float(self.kappa_online[0])


def fit_normalizer(trees: PackedTrees) -> nets_lib.Normalizer:
    """Feature statistics over every valid step of the given trees."""
    mask = np.arange(trees.step_cost.shape[2])[None, None] < trees.seg_len[..., None]
    return nets_lib.Normalizer.fit(jnp.asarray(trees.features), jnp.asarray(mask))


@functools.lru_cache(maxsize=64)
def _chunk_fn(learner: Learner, n: int):
    """Jitted `(states [S], run keys [S, 2], data, start) -> (states, metrics [S, n])`: n
    iterations from iteration `start`, vmapped over seeds — cached, so every trace set of the
    same shapes reuses one compiled program (the benchmark trains many)."""

    def one_seed(state, run_key, data, start):
        def body(state, i):
            return learner.update(state, data, jax.random.fold_in(run_key, i))

        return jax.lax.scan(body, state, start + jnp.arange(n))

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, None)))


def _init(learner: Learner, data, seeds: Sequence[int]):
    """(states [S], run keys [S, 2]): each seed's key splits into its run key and its init key.
    Initialised one seed at a time, eagerly: a jitted, vmapped init batches the orthogonal
    initialisers' QR factorisations, and XLA:CPU's batched QR can deadlock its own thread pool
    when two run at once (decision 82)."""
    keys = [jax.random.split(jax.random.PRNGKey(s)) for s in seeds]
    states = [learner.init(init_key, data) for _, init_key in keys]
    return (jax.tree.map(lambda *xs: jnp.stack(xs), *states),
            jnp.stack([run_key for run_key, _ in keys]))


def fit(learner: Learner, trees: PackedTrees, alpha: float, iterations: int,
        seeds: Sequence[int] = (0,), *, chunk: int = 100, workdir: str | Path | None = None,
        progress: Callable[[int, dict[str, float]], Any] | None = None) -> TrainResult:
    """Train `learner` on the train split of `trees` for every seed at once.

    Args:
      alpha: the target miscoverage the learner trains for.
      iterations: iterations per seed; `chunk`: iterations per jitted scan (and checkpoint).
      workdir: if given, every chunk's states go to `workdir/checkpoints/<iteration>` (orbax,
        the last two kept, each with its history beside it) and a restart continues from the
        newest intact one (a truncated one — a kill mid-save — falls back to the one before,
        decision 78).
      progress: called after every chunk with (iterations done, the chunk's mean metrics).
    """
    if iterations < 0 or chunk < 1 or not seeds:
        raise InputError("iterations ≥ 0, chunk ≥ 1 and at least one seed are required")
    train_idx = trees.split_indices("train")
    if len(train_idx) == 0:
        raise InputError("no usable problems in the 'train' split")
    data = learner.prepare(trees.subset(train_idx), alpha)
    states, run_keys = _init(learner, data, seeds)
    done, history = 0, []
    manager = None
    if workdir is not None:
        workdir = Path(workdir)
        manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                                             create=True))
        states, done, history = _restore(manager, workdir, states)
    while done < iterations:
        n = min(chunk, iterations - done)
        states, metrics = _chunk_fn(learner, n)(states, run_keys, data, jnp.int32(done))
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        if "nonfinite" in metrics and metrics["nonfinite"].any():
            first = done + int(np.argmax(metrics["nonfinite"].any(axis=0))) + 1
            raise FloatingPointError(f"{learner.name}: non-finite policy gradient at iteration "
                                     f"{first}; the data or config needs a look")
        history.append(metrics)
        done += n
        if manager is not None:
            _save(manager, workdir, done, states, history)
        if progress is not None:
            progress(done, {k: float(np.mean(v)) for k, v in metrics.items()})
    hist = {k: np.concatenate([h[k] for h in history], axis=1) for k in history[0]} \
        if history else {}
    return TrainResult(learner.name, learner.networks, data.normalizer,
                       jax.vmap(lambda s: s.params)(states),
                       np.asarray(jax.vmap(lambda s: s.kappa)(states), np.float64), hist,
                       tuple(int(s) for s in seeds))


def _history_file(workdir: Path, step: int) -> Path:
    return workdir / f"history-{step:09d}.npz"


def _restore(manager, workdir: Path, states):
    """The newest intact checkpoint's states, its iteration and its history (else the fresh
    states, 0, [])."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore({"state": states}))
        except Exception as e:  # noqa: BLE001 — any damage: try the previous one
            logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                            step, workdir, type(e).__name__)
            continue
        history = []
        hist_file = _history_file(workdir, int(step))
        if hist_file.exists():
            with np.load(hist_file) as h:
                history.append({k: h[k][:, :int(step)] for k in h.files})
        return restored["state"], int(step), history
    return states, 0, []


def _save(manager, workdir: Path, done: int, states, history) -> None:
    merged = {k: np.concatenate([h[k] for h in history], axis=1) for k in history[0]}
    path = _history_file(workdir, done)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **merged)
    tmp.replace(path)  # before its checkpoint: a checkpoint never lacks its history
    manager.save(done, args=ocp.args.StandardSave({"state": states}))
    manager.wait_until_finished()
    kept = set(manager.all_steps()) | {done}
    for old in workdir.glob("history-*.npz"):
        if int(old.stem.split("-")[1]) not in kept:
            old.unlink(missing_ok=True)


def router_family(trees: PackedTrees, log_prob_fn: Callable, name: str = "router (ours)",
                  grid_size: int = 201) -> guarantee.Family:
    """Eq. 6 (Γ, `core.route_rule`) with knob κ: κ from 0 (escalate at the first decision) up
    through quantiles of the policy's escalation scores on train nodes to above their maximum
    (never escalate)."""
    dev = env.to_device(trees)
    sub = env.gather(dev, jnp.arange(trees.num_problems))
    probs = np.exp(np.asarray(env.node_log_probs(log_prob_fn, sub)))
    model = np.broadcast_to(trees.seg_model[..., None], trees.step_cost.shape).astype(np.int32)
    s = threshold.escalation_score(np, probs, model)[guarantee.train_nodes(trees)]
    top = np.nextafter(np.float32(s.max() if s.size else 1.0), np.float32(2))
    grid = np.unique(np.concatenate([[0.0], np.quantile(s, np.linspace(0, 1, grid_size))
                                     if s.size else [], [top]]))

    def actions(kappa):
        return threshold.route_rule(np, probs, np.float32(kappa), model)

    return guarantee.Family(name, actions, [float(g) for g in grid])


def calibrate(result: TrainResult, trees: PackedTrees, alpha: float,
              grid_size: int = 201, delta: float | None = None) -> TrainResult:
    """Each seed's κ on the cal split by the one calibration rule of every method
    (`router_family` + `guarantee.calibrate_family`, decisions 17, 24, 68; PAC at δ,
    decision 88). An infeasible calibration deploys the safest κ (0: escalate at the first
    decision)."""
    trees.require_splits("cal")
    dev = env.to_device(trees)
    cal = env.instances(trees, trees.split_indices("cal"))
    kappas, feasible = [], []
    for i in range(len(result.seeds)):
        fam = router_family(trees, result.log_prob_fn(i), grid_size=grid_size)
        idx, ok, _ = guarantee.calibrate_family(trees, dev, fam, cal, alpha, delta)
        kappas.append(float(fam.grid[idx]))
        feasible.append(bool(ok))
    return result._replace(kappas=tuple(kappas), feasible=tuple(feasible),
                           calibration_problems=len(trees.split_indices("cal")))

