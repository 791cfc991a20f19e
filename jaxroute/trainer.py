"""The whole TCPO loop over packed trace trees: rollout → update, as jitted scans; checkpoints;
final κ calibration on the calibration split.

`train(trees, config, workdir)` is resumable: every `chunk` iterations the state and PRNG key are
saved with orbax under `workdir/checkpoints/<iteration>`, and a restart continues from the latest
one (same numbers as an uninterrupted run, since the chunk function is deterministic).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxroute import env, tcpo
from jaxroute import networks as nets_lib
from jaxroute.trace import PackedTrees


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The paper's defaults (Sec. 5.1): α = 0.02, 1000 iterations, batch 5, lr 1e-3, κ step 0.1."""

    tcpo: tcpo.TCPOConfig = tcpo.TCPOConfig()
    iterations: int = 1000
    batch_size: int = 5
    hidden: tuple[int, ...] = (64, 64)
    seed: int = 0
    chunk: int = 100  # iterations per jitted scan / checkpoint
    calibration_grid: int = 201  # κ quantiles of the train nodes' escalation scores (decision 24)
    final_calibration: bool = True

    def __post_init__(self):
        if self.iterations < 0 or self.batch_size < 1 or self.chunk < 1:
            raise ValueError("iterations ≥ 0, batch_size ≥ 1 and chunk ≥ 1 are required")


def config_from_dict(d: dict) -> TrainConfig:
    """Inverse of `dataclasses.asdict(TrainConfig)` (e.g. a run's train_config.json)."""
    try:
        return TrainConfig(**{**d, "tcpo": tcpo.TCPOConfig(**d["tcpo"]),
                              "hidden": tuple(int(h) for h in d["hidden"])})
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a TrainConfig: {e}") from None


@dataclasses.dataclass
class TrainResult:
    state: tcpo.TrainState
    networks: nets_lib.RouterNetworks
    kappa_online: float  # κ at the end of training
    kappa: float  # κ to deploy (final calibration if enabled and feasible, else online)
    calibration_feasible: bool
    history: dict[str, np.ndarray]  # per-iteration metrics


def make_chunk(networks: nets_lib.RouterNetworks, config: TrainConfig, n_iters: int):
    """Jitted `(state, key, trees_train) -> (state, key, metrics[n_iters])`."""
    update = tcpo.make_update(networks, config.tcpo)
    b = config.batch_size
    given = config.tcpo.coverage_event == "given"

    def one(carry, _):
        state, key, trees = carry
        key, k_prob, k_root, k_act, k_upd = jax.random.split(key, 5)
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
        state, metrics = update(state, batch, k_upd)
        return (state, key, trees), metrics

    @jax.jit
    def chunk(state, key, trees):
        (state, key, _), metrics = jax.lax.scan(one, (state, key, trees), None, length=n_iters)
        return state, key, metrics

    return chunk


def fit_normalizer(trees: PackedTrees) -> nets_lib.Normalizer:
    """Feature statistics over every valid step of the given trees."""
    mask = np.arange(trees.step_cost.shape[2])[None, None] < trees.seg_len[..., None]
    return nets_lib.Normalizer.fit(jnp.asarray(trees.features), jnp.asarray(mask))


def calibrate(networks, state: tcpo.TrainState, trees: PackedTrees, problem_idx: np.ndarray,
              alpha: float, grid_size: int = 201) -> tuple[float, bool, np.ndarray, np.ndarray]:
    """Final κ on the problems `problem_idx` (the cal split) by the one calibration rule of every
    method (`evaluate.router_family` + `evaluate.calibrate_family`, decisions 17, 24, 68).
    Returns (κ̂, feasible, grid, per-problem errors [n, G])."""
    from jaxroute import evaluate

    fam = evaluate.router_family(trees, evaluate.policy_fn(networks, state), grid_size=grid_size)
    idx, feasible, errors = evaluate.calibrate_family(trees, env.to_device(trees), fam,
                                                      env.instances(trees, problem_idx), alpha)
    return float(fam.grid[idx]), feasible, np.asarray(fam.grid), errors


def _checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )


def train(
    trees: PackedTrees,
    config: TrainConfig = TrainConfig(),
    workdir: str | Path | None = None,
    progress: Callable[[int, dict[str, float]], Any] | None = None,
) -> TrainResult:
    """Train a router on the train split of `trees`, calibrate κ on the cal split.

    Args:
      trees: packed trace trees (host arrays) with train and cal splits.
      config: training configuration.
      workdir: if given, checkpoints go to `workdir/checkpoints` and training resumes from them.
      progress: called after every chunk with (iterations done, mean metrics of the chunk).
    """
    train_idx = trees.split_indices("train")
    if len(train_idx) == 0:
        raise ValueError("no usable problems in the 'train' split")
    train_trees = trees.subset(train_idx)
    networks = nets_lib.make_networks(trees.num_models, trees.features.shape[-1], config.hidden)
    key = jax.random.PRNGKey(config.seed)
    key, init_key = jax.random.split(key)
    state = tcpo.init_state(networks, config.tcpo, init_key, fit_normalizer(train_trees))
    done = 0
    history: list[dict[str, np.ndarray]] = []
    manager = None
    if workdir is not None:
        workdir = Path(workdir)
        manager = _checkpoint_manager(workdir)
        latest = manager.latest_step()
        if latest is not None:
            restored = manager.restore(latest, args=ocp.args.StandardRestore(
                {"state": state, "key": key}))
            state, key, done = restored["state"], restored["key"], int(latest)
            hist_file = workdir / "history.npz"
            if hist_file.exists():
                with np.load(hist_file) as h:
                    history.append({k: h[k][:done] for k in h.files})
    dev = env.to_device(train_trees)
    chunks: dict[int, Callable] = {}
    while done < config.iterations:
        n = min(config.chunk, config.iterations - done)
        if n not in chunks:
            chunks[n] = make_chunk(networks, config, n)
        state, key, metrics = chunks[n](state, key, dev)
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        nonfinite = metrics["nonfinite"]
        if nonfinite.any():
            first = done + int(np.argmax(nonfinite)) + 1
            raise FloatingPointError(f"non-finite policy gradient at iteration {first}; the "
                                     "update kept θ but the data or config needs a look")
        history.append(metrics)
        done += n
        if manager is not None:
            manager.save(done, args=ocp.args.StandardSave({"state": state, "key": key}))
            manager.wait_until_finished()
            _save_history(workdir / "history.npz", history)
        if progress is not None:
            progress(done, {k: float(np.mean(v)) for k, v in metrics.items()})
    hist = {k: np.concatenate([h[k] for h in history]) for k in history[0]} if history else {}
    kappa_online = float(state.kappa)
    kappa, feasible = kappa_online, False
    if config.final_calibration:
        cal_idx = trees.split_indices("cal")
        if len(cal_idx) == 0:
            raise ValueError("final_calibration needs problems in the 'cal' split")
        k_hat, feasible, _, _ = calibrate(networks, state, trees, cal_idx, config.tcpo.alpha,
                                          config.calibration_grid)
        kappa = k_hat  # infeasible: κ = 0, escalate at the first decision
    return TrainResult(state=state, networks=networks, kappa_online=kappa_online, kappa=kappa,
                       calibration_feasible=feasible, history=hist)


def train_many(trees: PackedTrees, config: TrainConfig, seeds: Sequence[int]
               ) -> tuple[nets_lib.RouterNetworks, tcpo.TrainState]:
    """`train`'s TCPO loop for several seeds at once (one vmapped, jitted scan; no checkpoints,
    no final calibration): the benchmark's way to report seeds. Returns the networks and the
    final states stacked on a leading seed axis."""
    train_idx = trees.split_indices("train")
    if len(train_idx) == 0:
        raise ValueError("no usable problems in the 'train' split")
    train_trees = trees.subset(train_idx)
    networks = nets_lib.make_networks(trees.num_models, trees.features.shape[-1], config.hidden)
    norm = fit_normalizer(train_trees)

    def init(seed_key):
        key, init_key = jax.random.split(seed_key)
        return tcpo.init_state(networks, config.tcpo, init_key, norm), key

    states, keys = jax.vmap(init)(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    chunk = make_chunk(networks, config, config.iterations)
    states, _, metrics = jax.jit(jax.vmap(chunk, in_axes=(0, 0, None)))(
        states, keys, env.to_device(train_trees))
    if np.asarray(metrics["nonfinite"]).any():
        raise FloatingPointError("non-finite policy gradient in train_many")
    return networks, states


def train_and_export(trees: PackedTrees, manifest, config: TrainConfig, workdir: str | Path, *,
                     source: str, cost_model: str, router_dir: str | Path | None = None,
                     show_progress: bool = True) -> TrainResult:
    """The one "train a router and export it" path of every entry point: records the run
    (`workdir/train_config.json`: config, trace source, cost unit — what `launch.export` needs
    to re-export), trains resumably with checkpoints in `workdir`, and exports the router with
    `export.export_trained` to `router_dir` (default `workdir/router`)."""
    from tqdm import tqdm

    from jaxroute import export
    from jaxroute.durable import atomic_write_text

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "train_config.json", json.dumps(
        {"config": dataclasses.asdict(config), "source": source, "cost_model": cost_model},
        indent=2, default=str) + "\n")
    bar = tqdm(total=config.iterations, desc="      train", unit="it", disable=not show_progress)

    def progress(done, m):
        bar.update(done - bar.n)
        bar.set_postfix(kappa=f"{m['kappa']:.3f}", miss=f"{m['miscoverage']:.3f}",
                        cost=f"{m['batch_cost']:.2f}", esc=f"{m['batch_escalated']:.2f}")

    result = train(trees, config, workdir, progress)
    bar.close()
    export.export_trained(
        Path(router_dir) if router_dir else workdir / "router", networks=result.networks,
        policy_params=result.state.policy_params, normalizer=result.state.normalizer,
        kappa=result.kappa, manifest=manifest, alpha=config.tcpo.alpha, hidden=config.hidden,
        train_config={"trainer": "tcpo", **dataclasses.asdict(config)},
        extra={"kappa_online": result.kappa_online,
               "calibration_feasible": result.calibration_feasible, "cost_model": cost_model,
               "source": source})
    return result


def _save_history(path: Path, history: list[dict[str, np.ndarray]]) -> None:
    merged = {k: np.concatenate([h[k] for h in history]) for k in history[0]}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **merged)
    tmp.replace(path)
