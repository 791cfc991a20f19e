"""Train a router on trace trees, calibrate κ, export it.

    python -m launch.train --synthetic=1000 --workdir=runs/demo
    python -m launch.train --traces=traces/gsm8k --workdir=runs/gsm8k --alpha=0.02
    python -m launch.train --trainer=tcpo --synthetic=1000 --workdir=runs/paper   # the paper's

`--trainer=exact` (default, decision 67): the CPO step on exact tree expectations.
`--trainer=tcpo`: the paper's sampled TCPO (V-trace, batch 5). Either trains one router per
`--seeds` through the one training loop (decision 82), resumable from checkpoints in
--workdir, and exports the first. Unset flags take the chosen learner's config defaults.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from jaxroute import core, exact, guarantee, tcpo, trainer
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (router, config, checkpoints).")
_TRAINER = flags.DEFINE_enum("trainer", "exact", ["exact", "tcpo"], "Which trainer.")
_ALPHA = flags.DEFINE_float("alpha", None, "Target miscoverage α.")
_ITERS = flags.DEFINE_integer("iterations", None, "Training iterations.")
_HIDDEN = flags.DEFINE_list("hidden", None, "Hidden layer widths.")
_SEED = flags.DEFINE_integer("seed", 0, "Training seed (the first of --seeds).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Routers to train, one per seed (the first exported).")
_MAX_KL = flags.DEFINE_float("max_kl", None, "Trust-region radius δ.")
_BATCH = flags.DEFINE_integer("batch_size", None, "tcpo: episodes per iteration (exact: problems "
                              "per iteration, 0 = all).")
_LR = flags.DEFINE_float("learning_rate", None, "tcpo: critic learning rate (Adam).")
_KAPPA_STEP = flags.DEFINE_float("kappa_step", None, "tcpo: κ step size η₀.")
_EPS = flags.DEFINE_float("softmask_eps", None, "tcpo: softmask temperature ε.")
_EVENT = flags.DEFINE_enum("coverage_event", None, ["verifier", "outcome", "given"],
                           "tcpo: coverage event of the online κ update.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over in a --workdir that holds "
                               "another run's checkpoints (default: refuse, naming differences).")
flags.mark_flags_as_required(["workdir"])
_DELTA = common.define_guarantee_flags()
common.check_flags(alpha=(common.probability, "in (0, 1)"),
                   iterations=(lambda v: v >= 0, "≥ 0"), seeds=(common.positive, "≥ 1"),
                   batch_size=(lambda v: v >= 0, "≥ 0"), hidden=(common.widths, "widths ≥ 1"),
                   max_kl=(lambda v: v > 0, "> 0"), learning_rate=(lambda v: v > 0, "> 0"),
                   kappa_step=(lambda v: v > 0, "> 0"), softmask_eps=(lambda v: v > 0, "> 0"))


def _given(**kw):
    return {k: v for k, v in kw.items() if v is not None}


def build_config() -> trainer.TrainConfig:
    hidden = tuple(int(h) for h in _HIDDEN.value) if _HIDDEN.value else None
    common_kw = _given(alpha=_ALPHA.value, iterations=_ITERS.value, hidden=hidden,
                       max_kl=_MAX_KL.value, batch_size=_BATCH.value)
    if _TRAINER.value == "exact":
        cfg = exact.ExactConfig(**common_kw)
    else:
        cfg = tcpo.TCPOConfig(**common_kw, **_given(
            critic_lr=_LR.value, eta0=_KAPPA_STEP.value, softmask_eps=_EPS.value,
            coverage_event=_EVENT.value))
    return trainer.TrainConfig(cfg, seeds=tuple(range(_SEED.value, _SEED.value + _SEEDS.value)),
                               delta=_DELTA())


def run(config: trainer.TrainConfig, workdir: Path):
    manifest, trees, source = common.load_trees()
    pac_delta = config.delta if config.delta is not None else 0.1
    print(f"calibration split: {len(trees.split_indices('cal'))} problems; the least on which "
          f"anything can be certified at α = {config.alpha:g}: marginal "
          f"{core.min_calibration_size(config.alpha)}, PAC at δ = {pac_delta:g} "
          f"{core.min_calibration_size(config.alpha, pac_delta)}")
    res = trainer.train_and_export(trees, manifest, config, workdir, source=source,
                                   cost_model=common.cost_model(), overwrite=_OVERWRITE.value)
    g = guarantee.guarantee(config.alpha, config.delta, res.calibration_problems)
    print(f"κ deployed {res.kappa:.4g} ({guarantee.describe_guarantee(g)}; "
          f"{res.calibration_problems} calibration problems; calibration "
          f"{'feasible' if res.feasible[0] else 'INFEASIBLE'}); router exported to "
          f"{workdir / 'router'} ({config.to_dict()})")


def main(argv):
    del argv
    run(build_config(), Path(_WORKDIR.value))


if __name__ == "__main__":
    common.run(main)
