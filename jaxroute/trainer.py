"""The whole TCPO loop over packed trace trees: rollout → update, as jitted scans; checkpoints;
final κ calibration on the calibration split.

`train(trees, config, workdir)` is resumable: every `chunk` iterations the state and PRNG key are
saved with orbax under `workdir/checkpoints/<iteration>`, and a restart continues from the latest
one (same numbers as an uninterrupted run, since the chunk function is deterministic).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

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
    trees.require_splits(*(("train", "cal") if config.final_calibration else ("train",)))
    train_idx = trees.split_indices("train")
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
        # The newest intact checkpoint (a truncated one — a kill mid-save — falls back to the
        # one before it) with the history saved beside it for that same step (decision 78).
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(step, args=ocp.args.StandardRestore(
                    {"state": state, "key": key}))
            except Exception as e:  # noqa: BLE001 — any damage: try the previous one
                logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                                step, workdir, type(e).__name__)
                continue
            state, key, done = restored["state"], restored["key"], int(step)
            hist_file = _history_file(workdir, done)
            if hist_file.exists():
                with np.load(hist_file) as h:
                    history.append({k: h[k][:done] for k in h.files})
            break
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
            _save_history(_history_file(workdir, done), history)  # before its checkpoint
            manager.save(done, args=ocp.args.StandardSave({"state": state, "key": key}))
            manager.wait_until_finished()
            for old in workdir.glob("history-*.npz"):  # keep the histories of kept steps
                if int(old.stem.split("-")[1]) not in set(manager.all_steps()) | {done}:
                    old.unlink(missing_ok=True)
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


@functools.lru_cache(maxsize=16)
def _many_fn(config: TrainConfig, num_models: int, num_features: int):
    """Networks and the jitted, seed-vmapped whole run for `config` — cached, so every trace set
    of the same shapes reuses one compiled program (the benchmark trains many)."""
    networks = nets_lib.make_networks(num_models, num_features, config.hidden)
    chunk = make_chunk(networks, config, config.iterations)
    return networks, jax.jit(jax.vmap(chunk, in_axes=(0, 0, None)))


def train_many(trees: PackedTrees, config: TrainConfig, seeds: Sequence[int]
               ) -> tuple[nets_lib.RouterNetworks, tcpo.TrainState]:
    """`train`'s TCPO loop for several seeds at once (one vmapped, jitted scan; no checkpoints,
    no final calibration): the benchmark's way to report seeds. Returns the networks and the
    final states stacked on a leading seed axis."""
    train_idx = trees.split_indices("train")
    if len(train_idx) == 0:
        raise ValueError("no usable problems in the 'train' split")
    train_trees = trees.subset(train_idx)
    networks, run = _many_fn(config, trees.num_models, trees.features.shape[-1])
    norm = fit_normalizer(train_trees)

    def init(seed_key):
        key, init_key = jax.random.split(seed_key)
        return tcpo.init_state(networks, config.tcpo, init_key, norm), key

    states, keys = jax.vmap(init)(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    states, _, metrics = run(states, keys, env.to_device(train_trees))
    if np.asarray(metrics["nonfinite"]).any():
        raise FloatingPointError("non-finite policy gradient in train_many")
    return networks, states


def run_fingerprint(trees: PackedTrees, config: TrainConfig, cost_model: str) -> dict:
    """What a resumable run is: its config (but the length, which a resume may extend), the cost
    unit and the trace set (`PackedTrees.fingerprint`)."""
    cfg = dataclasses.asdict(config)
    for k in ("iterations", "chunk"):
        cfg.pop(k)
    # Through JSON, as it is recorded (tuples become lists).
    return json.loads(json.dumps({"config": cfg, "cost_model": cost_model,
                                  "trace_set": trees.fingerprint()}, default=str))


def check_workdir(workdir: Path, fingerprint: dict, overwrite: bool) -> None:
    """A workdir belongs to one run (decision 78): resume only when `fingerprint` matches the
    one recorded there; otherwise refuse, naming the differences — or, with `overwrite`, delete
    its checkpoints and start over."""
    import shutil

    ckpts = workdir / "checkpoints"
    record = workdir / "train_config.json"
    if not (ckpts.exists() and any(ckpts.iterdir())):
        return
    old = json.loads(record.read_text()).get("fingerprint") if record.exists() else None
    if old == fingerprint:
        return
    if overwrite:
        shutil.rmtree(ckpts)
        for f in workdir.glob("history-*.npz"):
            f.unlink()
        return
    diffs = _differences(old or {}, fingerprint)
    raise FileExistsError(f"{workdir} holds checkpoints of another run ({'; '.join(diffs[:6])}):"
                          " use another --workdir, or pass --overwrite to start over")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            short = lambda x: x[:12] + "…" if isinstance(x, str) and len(x) > 16 else x  # noqa
            out.append(f"{prefix}{k}: {short(a)!r} → {short(b)!r}")
    return out


def train_and_export(trees: PackedTrees, manifest, config: TrainConfig, workdir: str | Path, *,
                     source: str, cost_model: str, router_dir: str | Path | None = None,
                     show_progress: bool = True, overwrite: bool = False) -> TrainResult:
    """The one "train a router and export it" path of every entry point: records the run
    (`workdir/train_config.json`: config, trace source, cost unit — what `launch.export` needs
    to re-export), trains resumably with checkpoints in `workdir`, and exports the router with
    `export.export_trained` to `router_dir` (default `workdir/router`)."""

    from jaxroute.durable import atomic_write_text, exclusive

    workdir = Path(workdir)
    with exclusive(workdir):
        trees.require_splits("train", "cal", where=source)
        fingerprint = run_fingerprint(trees, config, cost_model)
        check_workdir(workdir, fingerprint, overwrite)
        atomic_write_text(workdir / "train_config.json", json.dumps(
            {"config": dataclasses.asdict(config), "source": source, "cost_model": cost_model,
             "fingerprint": fingerprint}, indent=2, default=str) + "\n")
        return _train_and_export(trees, manifest, config, workdir, source, cost_model,
                                 router_dir, show_progress)


def _train_and_export(trees, manifest, config, workdir, source, cost_model, router_dir,
                      show_progress) -> TrainResult:
    from tqdm import tqdm

    from jaxroute import export

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


def _history_file(workdir: Path, step: int) -> Path:
    return workdir / f"history-{step:09d}.npz"


def _save_history(path: Path, history: list[dict[str, np.ndarray]]) -> None:
    merged = {k: np.concatenate([h[k] for h in history]) for k in history[0]}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **merged)
    tmp.replace(path)


def reexport(workdir: Path, record: dict, trees: PackedTrees, manifest, source: str,
             out: Path) -> dict[str, float]:
    """Re-export the router of the run in `workdir` (its `train_config.json` is `record`) and
    check the copy: a TCPO run resumes from its checkpoints (nothing is retrained when it
    finished; they must be of this config and trace set), an exact-trainer run is retrained
    (deterministic, seconds). The exported copy must give the run's π on every cal node
    (max |Δπ| ≤ 1e-5), else `RuntimeError`. Returns κ, α, the nodes checked and the gap."""
    from jaxroute import evaluate, exact, export

    cost_model = record.get("cost_model", "flops")
    if record.get("trainer") == "exact":
        config = exact.config_from_dict(record["config"])
        fit = exact.train_and_export(trees, manifest, config, workdir,
                                     seeds=tuple(record.get("seeds", (0,))), source=source,
                                     cost_model=cost_model, router_dir=out)
        policy, kappa, alpha = fit.result.log_prob_fn(0), fit.kappas[0], config.alpha
    else:
        config = config_from_dict(record["config"])
        if not (workdir / "checkpoints").exists():
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoints to export")
        check_workdir(workdir, run_fingerprint(trees, config, cost_model), overwrite=False)
        result = train(trees, config, workdir)  # resumes; trains only what is missing
        export.export_trained(
            out, networks=result.networks, policy_params=result.state.policy_params,
            normalizer=result.state.normalizer, kappa=result.kappa, manifest=manifest,
            alpha=config.tcpo.alpha, hidden=config.hidden,
            train_config={"trainer": "tcpo", **dataclasses.asdict(config)},
            extra={"kappa_online": result.kappa_online,
                   "calibration_feasible": result.calibration_feasible,
                   "cost_model": cost_model, "source": source})
        policy = evaluate.policy_fn(result.networks, result.state)
        kappa, alpha = result.kappa, config.tcpo.alpha
    router = export.load_router(out, feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    cal = trees.subset(trees.split_indices("cal"))
    feats = cal.features.reshape(-1, cal.features.shape[-1])
    models = np.repeat(cal.seg_model.reshape(-1), cal.features.shape[-2])
    mine = np.exp(np.asarray(policy(feats, models)))
    theirs = np.asarray(router.probs(feats, models))
    gap = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
    if not gap <= 1e-5:
        raise RuntimeError(f"{out}: exported router disagrees with the run (max |Δπ| = {gap})")
    return {"kappa": kappa, "alpha": alpha, "nodes": len(feats), "gap": gap}
