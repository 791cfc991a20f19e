"""Evaluate an exported router against baselines and the oracle on the test split.

    python -m launch.evaluate --synthetic=1000 --workdir=runs/demo
    python -m launch.evaluate --traces=traces/gsm8k --workdir=runs/gsm8k --out=runs/gsm8k/report

Writes table.md, table.json, accuracy_cost.png and config.json to --out (default
WORKDIR/report) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from jaxroute import evaluate, export
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Training folder holding router/.")
_OUT = flags.DEFINE_string("out", None, "Report folder (default WORKDIR/report).")
_CONF = flags.DEFINE_string("confidence_feature", "confidence",
                            "Feature used by the threshold and STEER baselines.")
_STEP = flags.DEFINE_string("step_feature", "step_index", "Step-index feature (STEER buckets).")
_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed for bootstrap CIs and random escalation.")
flags.mark_flags_as_required(["workdir"])

UNITS = {"flops": "FLOPs ×1e12", "usd_cents": "US cents"}


def run(workdir: Path, out: Path | None = None) -> dict:
    manifest, trees, source = common.load_trees()
    router = export.load_router(workdir / "router", feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    names = list(manifest.feature_names)
    conf = names.index(_CONF.value) if _CONF.value in names else None
    step = names.index(_STEP.value) if _STEP.value in names else None
    result = evaluate.evaluate_all(trees, router.log_probs, router.kappa, router.meta["alpha"],
                                   conf, step, _SEED.value)
    title = f"{'SYNTHETIC ' if manifest.synthetic else ''}test split — {source}"
    out = out or workdir / "report"
    report.write_report(out, result, UNITS[common.cost_model()], title,
                        {"router": router.meta, "source": source,
                         "cost_model": common.cost_model()})
    print(report.markdown_table(result["rows"], UNITS[common.cost_model()], title))
    print(f"report written to {out}")
    return result


def main(argv):
    del argv
    common.quiet()
    run(Path(_WORKDIR.value), Path(_OUT.value) if _OUT.value else None)


if __name__ == "__main__":
    app.run(main)
