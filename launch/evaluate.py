"""Evaluate an exported router against baselines, references and the oracle on the test split,
every method calibrated on the calibration split by the same conformal rule (decision 68).

    python -m launch.evaluate --synthetic=1000 --workdir=runs/demo
    python -m launch.evaluate --traces=traces/gsm8k --workdir=runs/gsm8k --out=runs/gsm8k/report

Writes table.md, table.json, accuracy_cost.png and config.json to --out (default
WORKDIR/report) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags
from tqdm import tqdm

from jaxroute import evaluate, exact, export, trainer
from launch import common, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Training folder holding router/.")
_OUT = flags.DEFINE_string("out", None, "Report folder (default WORKDIR/report).")
_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed for bootstrap CIs and random escalation.")
_ALPHAS = flags.DEFINE_list("sweep_alphas", [], "Also train a router per α (the default "
                            "trainer) and add its points, e.g. 0.01,0.02,0.05,0.1,0.2.")
flags.mark_flags_as_required(["workdir"])


def run(workdir: Path, out: Path | None = None) -> dict:
    manifest, trees, source = common.load_trees()
    router = export.load_router(workdir / "router", feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    alpha = router.meta["alpha"]
    # Every method at the router's own guarantee (marginal, or PAC at its δ; decision 88).
    result = evaluate.evaluate_all(trees, {router.label: router.log_probs}, alpha,
                                   manifest.feature_names, _SEED.value,
                                   delta=router.guarantee.get("delta"))
    if _ALPHAS.value:
        result["curves"]["router, α sweep"] = alpha_sweep(
            trees, manifest.feature_names, [float(a) for a in _ALPHAS.value])
    unit = report.UNITS[common.cost_model()]
    title = f"{'SYNTHETIC ' if manifest.synthetic else ''}test split, α = {alpha} — {source}"
    out = out or workdir / "report"
    report.write_report(out, result, unit, title, {"router": router.meta, "source": source,
                                                   "cost_model": common.cost_model()})
    print(report.markdown_table(result["rows"], unit, title) + report.matched_line(result, unit))
    print(f"report written to {out}")
    return result


def alpha_sweep(trees, feature_names, alphas) -> list[dict]:
    """One router per α (trained, calibrated at that α); its test row, tagged with α."""
    points = []
    for a in tqdm(alphas, desc="α sweep"):
        res = trainer.train(trees, trainer.TrainConfig(exact.ExactConfig(alpha=a),
                                                       final_calibration=False))
        out = evaluate.evaluate_all(trees, {"r": res.log_prob_fn(0)}, a, feature_names,
                                    _SEED.value, references=False)
        points.append(dict(next(r for r in out["rows"] if r["method"] == "r"), alpha=a))
    return points


def main(argv):
    del argv
    run(Path(_WORKDIR.value), Path(_OUT.value) if _OUT.value else None)


if __name__ == "__main__":
    common.run(main)
