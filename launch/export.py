"""Re-export the router of an existing training run (e.g. after an interrupted export, or to
refresh the metadata) and check the exported copy against the run.

    python -m launch.export --workdir=runs/demo --synthetic=1000
    python -m launch.export --workdir=runs/gsm8k --traces=traces/gsm8k --out=serving/router

The run's train_config.json gives the configuration; training resumes from its last checkpoint
(nothing is retrained when it finished) and κ is calibrated again on the cal split exactly as at
the end of training. The trace set comes from --traces/--synthetic, else from the run's record.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from jaxroute import trace, traceset, trainer
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder (train_config.json, "
                               "checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Router folder to write (default WORKDIR/router).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    work = Path(_WORKDIR.value)
    cfg_file = work / "train_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found (is {work} a training run folder?)")
    record = json.loads(cfg_file.read_text())
    try:
        manifest, trees, source = common.load_trees()
    except flags.ValidationError:
        src = record.get("source", "")
        if not Path(src).is_dir():
            raise flags.ValidationError(f"{cfg_file}: the run's trace source {src!r} is not a "
                                        "folder; give --traces or --synthetic") from None
        manifest, problems = traceset.load_trace_set(src)
        trees, source = trace.pack(manifest, problems, record.get("cost_model", "flops")), src
    out = Path(_OUT.value) if _OUT.value else work / "router"
    done = trainer.reexport(work, record, trees, manifest, source, out)
    print(f"exported {out} (κ = {done['kappa']:.4g}, α = {done['alpha']}); checked on "
          f"{done['nodes']} cal nodes: max |Δπ| = {done['gap']:.1e}")


if __name__ == "__main__":
    common.run(main)
