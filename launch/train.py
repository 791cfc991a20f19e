"""Train a TCPO router on trace trees, calibrate κ, export it.

    python -m launch.train --synthetic=1000 --workdir=runs/demo
    python -m launch.train --traces=traces/gsm8k --workdir=runs/gsm8k --alpha=0.02

Resumable: re-running with the same --workdir continues from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from jaxroute import tcpo, trainer
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, router, history).")
_T, _C = tcpo.TCPOConfig, trainer.TrainConfig  # flag defaults are the configs' defaults
_ALPHA = flags.DEFINE_float("alpha", _T.alpha, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", _C.iterations, "Training iterations.")
_BATCH = flags.DEFINE_integer("batch_size", _C.batch_size, "Episodes per iteration.")
_LR = flags.DEFINE_float("learning_rate", _T.critic_lr, "Critic learning rate (Adam).")
_KAPPA_STEP = flags.DEFINE_float("kappa_step", _T.eta0, "κ step size η₀.")
_EPS = flags.DEFINE_float("softmask_eps", _T.softmask_eps, "Softmask temperature ε.")
_MAX_KL = flags.DEFINE_float("max_kl", _T.max_kl, "Trust-region radius δ.")
_EVENT = flags.DEFINE_enum("coverage_event", _T.coverage_event, ["verifier", "outcome", "given"],
                           "Coverage event of the online κ update (given = exact tree replay).")
_HIDDEN = flags.DEFINE_list("hidden", [str(h) for h in _C.hidden], "Hidden layer widths.")
_SEED = flags.DEFINE_integer("seed", _C.seed, "Training seed.")
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
    result = trainer.train_and_export(trees, manifest, config, workdir, source=source,
                                      cost_model=common.cost_model())
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
