"""Evaluate an exported router against baselines and the oracle on the test split.

    python -m launch.evaluate --synthetic=1000 --workdir=runs/demo
    python -m launch.evaluate --traces=traces/gsm8k --workdir=runs/gsm8k --out=runs/gsm8k/report

Writes table.md, table.json, accuracy_cost.png and config.json to --out (default
WORKDIR/report) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from tqdm import tqdm

from jaxroute import evaluate, export, tcpo, trainer
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Training folder holding router/.")
_OUT = flags.DEFINE_string("out", None, "Report folder (default WORKDIR/report).")
_CONF = flags.DEFINE_string("confidence_feature", "confidence",
                            "Feature used by the threshold and STEER baselines.")
_STEP = flags.DEFINE_string("step_feature", "step_index", "Step-index feature (STEER buckets).")
_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed for bootstrap CIs and random escalation.")
_ALPHAS = flags.DEFINE_list("sweep_alphas", [], "Also train a router per α (paper defaults "
                            "otherwise) and add the α-Pareto curve, e.g. 0.01,0.02,0.05,0.1,0.2.")
flags.mark_flags_as_required(["workdir"])

UNITS = report.UNITS


def run(workdir: Path, out: Path | None = None) -> dict:
    manifest, trees, source = common.load_trees()
    router = export.load_router(workdir / "router", feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    names = list(manifest.feature_names)
    conf = names.index(_CONF.value) if _CONF.value in names else None
    step = names.index(_STEP.value) if _STEP.value in names else None
    result = evaluate.evaluate_all(trees, router.log_probs, router.kappa, router.meta["alpha"],
                                   conf, step, _SEED.value)
    if _ALPHAS.value:
        result["curves"]["TCPO router, α sweep"] = alpha_sweep(
            trees, [float(a) for a in _ALPHAS.value], tuple(router.meta["hidden"]), conf, step)
    title = f"{'SYNTHETIC ' if manifest.synthetic else ''}test split — {source}"
    out = out or workdir / "report"
    report.write_report(out, result, UNITS[common.cost_model()], title,
                        {"router": router.meta, "source": source,
                         "cost_model": common.cost_model()})
    print(report.markdown_table(result["rows"], UNITS[common.cost_model()], title)
          + report.matched_line(result, UNITS[common.cost_model()]))
    print(f"report written to {out}")
    return result


def alpha_sweep(trees, alphas, hidden, conf, step) -> list[dict]:
    """One trained-and-calibrated router per α; its test row, tagged with α."""
    points = []
    for a in tqdm(alphas, desc="α sweep"):
        cfg = trainer.TrainConfig(tcpo=tcpo.TCPOConfig(alpha=a), hidden=hidden)
        res = trainer.train(trees, cfg)
        out = evaluate.evaluate_all(trees, evaluate.policy_fn(res.networks, res.state), res.kappa,
                                    a, None, None, _SEED.value)
        row = next(r for r in out["rows"] if r["method"] == "TCPO router (ours)")
        points.append(dict(row, alpha=a))
    return points


def main(argv):
    del argv
    common.quiet()
    run(Path(_WORKDIR.value), Path(_OUT.value) if _OUT.value else None)


if __name__ == "__main__":
    app.run(main)
