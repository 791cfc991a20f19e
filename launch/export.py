"""Re-export the router of an existing training run (e.g. after an interrupted export, or to
refresh the metadata) and check the exported copy against the run.

    python -m launch.export --workdir=runs/demo --synthetic=1000
    python -m launch.export --workdir=runs/gsm8k --traces=traces/gsm8k --out=serving/router

The run's train_config.json gives the configuration; training resumes from its last checkpoint
(nothing is retrained when it finished) and κ is calibrated again on the cal split exactly as at
the end of training. The trace set comes from --traces/--synthetic, else from the run's record.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import flags

from jaxroute import evaluate, export, trace, trainer
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder (train_config.json, "
                               "checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Router folder to write (default WORKDIR/router).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    common.quiet()
    work = Path(_WORKDIR.value)
    cfg_file = work / "train_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found (is {work} a training run folder?)")
    record = json.loads(cfg_file.read_text())
    config = trainer.config_from_dict(record["config"])
    try:
        manifest, trees, source = common.load_trees()
    except flags.ValidationError:
        src = record.get("source", "")
        if not Path(src).is_dir():
            raise flags.ValidationError(f"{cfg_file}: the run's trace source {src!r} is not a "
                                        "folder; give --traces or --synthetic") from None
        manifest, problems = trace.load_trace_set(src)
        trees, source = trace.pack(manifest, problems, record.get("cost_model", "flops")), src
    if not (work / "checkpoints").exists():
        raise FileNotFoundError(f"{work / 'checkpoints'}: no checkpoints to export")
    result = trainer.train(trees, config, work)  # resumes; trains only what is missing
    out = Path(_OUT.value) if _OUT.value else work / "router"
    export.export_trained(
        out, networks=result.networks, policy_params=result.state.policy_params,
        normalizer=result.state.normalizer, kappa=result.kappa, manifest=manifest,
        alpha=config.tcpo.alpha, hidden=config.hidden,
        train_config={"trainer": "tcpo", **dataclasses.asdict(config)},
        extra={"kappa_online": result.kappa_online,
               "calibration_feasible": result.calibration_feasible,
               "cost_model": record.get("cost_model", "flops"), "source": source})
    # The exported copy must decide exactly as the run's policy on the cal split's features.
    router = export.load_router(out, feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    cal = trees.subset(trees.split_indices("cal"))
    feats, models = cal.features.reshape(-1, cal.features.shape[-1]), \
        np.repeat(cal.seg_model.reshape(-1), cal.features.shape[-2])
    mine = np.exp(np.asarray(evaluate.policy_fn(result.networks, result.state)(feats, models)))
    theirs = np.asarray(router.probs(feats, models))
    gap = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
    if not gap <= 1e-5:
        raise RuntimeError(f"{out}: exported router disagrees with the run (max |Δπ| = {gap})")
    print(f"exported {out} (κ = {result.kappa:.4g}, α = {config.tcpo.alpha}); checked on "
          f"{len(feats)} cal nodes: max |Δπ| = {gap:.1e}")


if __name__ == "__main__":
    common.run(main)
