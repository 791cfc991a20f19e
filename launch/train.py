"""Train a TCPO router on trace trees, calibrate κ, export it.

    python -m launch.train --synthetic=1000 --workdir=runs/demo
    python -m launch.train --traces=traces/gsm8k --workdir=runs/gsm8k --alpha=0.02

Resumable: re-running with the same --workdir continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

from jaxroute import tcpo, trainer
from jaxroute.trace import atomic_write_text
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, router, history).")
_ALPHA = flags.DEFINE_float("alpha", 0.02, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", 1000, "Training iterations.")
_BATCH = flags.DEFINE_integer("batch_size", 5, "Episodes per iteration.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Critic learning rate (Adam).")
_KAPPA_STEP = flags.DEFINE_float("kappa_step", 0.1, "κ step size η₀.")
_EPS = flags.DEFINE_float("softmask_eps", tcpo.TCPOConfig.softmask_eps, "Softmask temperature ε.")
_MAX_KL = flags.DEFINE_float("max_kl", 0.01, "Trust-region radius δ.")
_EVENT = flags.DEFINE_enum("coverage_event", "verifier", ["verifier", "outcome", "given"],
                           "Coverage event of the online κ update (given = exact tree replay).")
_HIDDEN = flags.DEFINE_list("hidden", ["64", "64"], "Hidden layer widths.")
_SEED = flags.DEFINE_integer("seed", 0, "Training seed.")
flags.mark_flags_as_required(["workdir"])


def build_config() -> trainer.TrainConfig:
    return trainer.TrainConfig(
        tcpo=tcpo.TCPOConfig(alpha=_ALPHA.value, critic_lr=_LR.value, eta0=_KAPPA_STEP.value,
                             softmask_eps=_EPS.value, max_kl=_MAX_KL.value,
                             coverage_event=_EVENT.value),
        iterations=_ITERS.value, batch_size=_BATCH.value,
        hidden=tuple(int(h) for h in _HIDDEN.value), seed=_SEED.value)


def run(config: trainer.TrainConfig, workdir: Path) -> trainer.TrainResult:
    manifest, trees, source = common.load_trees()
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "train_config.json", json.dumps(
        {"config": dataclasses.asdict(config), "source": source,
         "cost_model": common.cost_model()}, indent=2, default=str) + "\n")
    bar = tqdm(total=config.iterations, desc="train", unit="it")

    def progress(done, m):
        bar.update(done - bar.n)
        bar.set_postfix(kappa=f"{m['kappa']:.3f}", miss=f"{m['miscoverage']:.3f}",
                        cost=f"{m['batch_cost']:.2f}", esc=f"{m['batch_escalated']:.2f}")

    result = trainer.train(trees, config, workdir, progress)
    bar.close()
    common.export_result(workdir / "router", result, manifest, config,
                         {"cost_model": common.cost_model(), "source": source})
    print(f"κ online {result.kappa_online:.4f}, deployed {result.kappa:.4f} "
          f"(final calibration {'feasible' if result.calibration_feasible else 'INFEASIBLE'}); "
          f"router exported to {workdir / 'router'}")
    return result


def main(argv):
    del argv
    common.quiet()
    run(build_config(), Path(_WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
