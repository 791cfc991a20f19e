"""Training runs: which learner with which config and seeds, resumable in a workdir, calibrated,
exported — the one "train a router" path of every entry point.

`train(trees, TrainConfig(ExactConfig(...)))` runs the default learner (CPO on exact tree
expectations, decision 67); `TrainConfig(TCPOConfig(...))` the paper's TCPO. Either way the
loop is `learner.fit` and the result a `learner.TrainResult` (decision 82).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxroute import exact, export, guarantee, learner, tcpo
from jaxroute.durable import atomic_write_text, exclusive
from jaxroute.errors import InputError
from jaxroute.trace import PackedTrees

# The learners by config type and by the name recorded in a run (train_config.json).
LEARNERS = {"exact": (exact.ExactConfig, exact.make_learner),
            "tcpo": (tcpo.TCPOConfig, tcpo.make_learner)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: the learner's config, the seeds (one router each; the first is
    exported), and the loop's settings."""

    learner: exact.ExactConfig | tcpo.TCPOConfig = exact.ExactConfig()
    seeds: tuple[int, ...] = (0,)
    chunk: int = 100  # iterations per jitted scan / checkpoint
    calibration_grid: int = 201  # κ quantiles of the train nodes' escalation scores (decision 24)
    final_calibration: bool = True
    delta: float | None = None  # None: the marginal guarantee; else PAC at δ (decision 88)

    def __post_init__(self):
        if not self.seeds or self.chunk < 1:
            raise InputError("at least one seed and chunk ≥ 1 are required")
        if self.delta is not None and not 0 < self.delta < 1:
            raise InputError(f"delta must be in (0, 1) or None (marginal), got {self.delta}")
        self.learner_name  # noqa: B018 — refuses an unknown config type

    @property
    def learner_name(self) -> str:
        for name, (cls, _) in LEARNERS.items():
            if isinstance(self.learner, cls):
                return name
        raise InputError(f"no learner takes a {type(self.learner).__name__}")

    @property
    def alpha(self) -> float:
        return self.learner.alpha

    def to_dict(self) -> dict:
        return {"learner": self.learner_name, "config": dataclasses.asdict(self.learner),
                "seeds": list(self.seeds), "chunk": self.chunk,
                "calibration_grid": self.calibration_grid,
                "final_calibration": self.final_calibration, "delta": self.delta}


def config_from_dict(d: dict) -> TrainConfig:
    """Inverse of `TrainConfig.to_dict` (e.g. a run's train_config.json)."""
    try:
        cls = LEARNERS[d["learner"]][0]
        cfg = dict(d["config"], hidden=tuple(int(h) for h in d["config"]["hidden"]))
        delta = d.get("delta")
        return TrainConfig(cls(**cfg), tuple(int(s) for s in d["seeds"]), int(d["chunk"]),
                           int(d["calibration_grid"]), bool(d["final_calibration"]),
                           None if delta is None else float(delta))
    except (KeyError, TypeError) as e:
        raise InputError(f"not a training run's config: {type(e).__name__}: {e}") from None


def make_learner(config: TrainConfig, trees: PackedTrees) -> learner.Learner:
    return LEARNERS[config.learner_name][1](config.learner, trees.num_models,
                                            trees.features.shape[-1])


def train(trees: PackedTrees, config: TrainConfig = TrainConfig(),
          workdir: str | Path | None = None,
          progress: Callable[[int, dict[str, float]], Any] | None = None
          ) -> learner.TrainResult:
    """Train one router per seed on the train split of `trees` (resumably, with checkpoints in
    `workdir` when given) and calibrate each κ on the cal split."""
    trees.require_splits(*(("train", "cal") if config.final_calibration else ("train",)))
    if config.final_calibration:  # an impossible guarantee fails before any training
        guarantee.check_calibration_size(len(trees.split_indices("cal")), config.alpha,
                                        config.delta)
    result = learner.fit(make_learner(config, trees), trees, config.alpha,
                         config.learner.iterations, config.seeds, chunk=config.chunk,
                         workdir=workdir, progress=progress)
    if config.final_calibration:
        result = learner.calibrate(result, trees, config.alpha, config.calibration_grid,
                                   config.delta)
    return result


def run_fingerprint(trees: PackedTrees, config: TrainConfig, cost_model: str) -> dict:
    """What a resumable run is: its config (but the length, which a resume may extend), the cost
    unit and the trace set (`PackedTrees.fingerprint`)."""
    cfg = config.to_dict()
    cfg["config"].pop("iterations")
    cfg.pop("chunk")
    cfg.pop("delta")  # the guarantee is the final calibration's: the checkpoints do not depend on it
    # Through JSON, as it is recorded (tuples become lists).
    return json.loads(json.dumps({"config": cfg, "cost_model": cost_model,
                                  "trace_set": trees.fingerprint()}, default=str))


def check_workdir(workdir: Path, fingerprint: dict, overwrite: bool) -> None:
    """A workdir belongs to one run (decision 78): resume only when `fingerprint` matches the
    one recorded there; otherwise refuse, naming the differences — or, with `overwrite`, delete
    its checkpoints and start over."""
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
                     show_progress: bool = True, overwrite: bool = False
                     ) -> learner.TrainResult:
    """Record the run (`workdir/train_config.json`: config, trace source, cost unit, fingerprint
    — what `launch.export` needs to re-export), train resumably with checkpoints in `workdir`,
    and export the first seed's router to `router_dir` (default `workdir/router`)."""
    workdir = Path(workdir)
    with exclusive(workdir):
        trees.require_splits("train", "cal", where=source)
        fingerprint = run_fingerprint(trees, config, cost_model)
        check_workdir(workdir, fingerprint, overwrite)
        atomic_write_text(workdir / "train_config.json", json.dumps(
            {**config.to_dict(), "source": source, "cost_model": cost_model,
             "fingerprint": fingerprint}, indent=2, default=str) + "\n")
        bar = tqdm(total=config.learner.iterations, desc=f"      train ({config.learner_name})",
                   unit="it", disable=not show_progress)

        def progress(done, m):
            bar.update(done - bar.n)
            shown = {k: m[k] for k in ("kappa", "miscoverage", "cost", "miss") if k in m}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})

        result = train(trees, config, workdir, progress)
        bar.close()
        export_result(Path(router_dir) if router_dir else workdir / "router", result, config,
                      manifest, source, cost_model)
        return result


def export_result(path: Path, result: learner.TrainResult, config: TrainConfig, manifest,
                  source: str, cost_model: str) -> Path:
    """The first seed's router of `result` (`export.export_trained`, the one export path)."""
    return export.export_trained(
        path, networks=result.networks, policy_params=result.policy(0),
        normalizer=result.normalizer, kappa=result.kappa, manifest=manifest, alpha=config.alpha,
        hidden=config.learner.hidden,
        train_config={"trainer": config.learner_name, **dataclasses.asdict(config.learner),
                      "seed": config.seeds[0]},
        extra={"guarantee": guarantee.guarantee(config.alpha, config.delta,
                                               result.calibration_problems),
               "kappa_online": float(result.kappa_online[0]),
               "calibration_feasible": bool(result.feasible[0]) if result.feasible else False,
               "cost_model": cost_model, "source": source})


def reexport(workdir: Path, record: dict, trees: PackedTrees, manifest, source: str,
             out: Path) -> dict[str, float]:
    """Re-export the router of the run in `workdir` (its `train_config.json` is `record`) and
    check the copy: the run resumes from its checkpoints (nothing is retrained when it
    finished; they must be of this config and trace set), holding the run folder's lock (a
    training run or another export in it is refused, `durable.FolderInUse`; decision 90). The
    exported copy must give the run's π on every cal node (max |Δπ| ≤ 1e-5), else
    `RuntimeError`. Returns κ, α, the nodes checked and the gap."""
    cost_model = record.get("cost_model", "flops")
    config = config_from_dict(record)
    if not (workdir / "checkpoints").exists():
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoints to export")
    with exclusive(workdir):  # the lock `train_and_export` holds: one writer per run folder
        check_workdir(workdir, run_fingerprint(trees, config, cost_model), overwrite=False)
        result = train(trees, config, workdir)  # resumes; trains only what is missing
        export_result(out, result, config, manifest, source, cost_model)
    router = export.load_router(out, feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    cal = trees.subset(trees.split_indices("cal"))
    feats = cal.features.reshape(-1, cal.features.shape[-1])
    models = np.repeat(cal.seg_model.reshape(-1), cal.features.shape[-2])
    mine = np.exp(np.asarray(result.log_prob_fn(0)(feats, models)))
    theirs = np.exp(np.asarray(router.log_probs(feats, models)))
    gap = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
    if not gap <= 1e-5:
        raise RuntimeError(f"{out}: exported router disagrees with the run (max |Δπ| = {gap})")
    return {"kappa": result.kappa, "alpha": config.alpha, "nodes": len(feats), "gap": gap}
