"""Measurements of the embedded default, in one run on this machine (decisions 91, 92):

- the regime: one-shot accuracy of the small and the large model on the built-in test split,
  and small-only coverage (the share of the large model's right answers the small one gets);
- the signals: each single score's AUROC for "this step is wrong" (the rule verifier) and for
  "continuing with the small model leaves the answer uncovered", on the small model's stepwise
  trajectories, and the stand-in PRM's AUROC on held-out steps (`main_job.quality`);
- wall time of stepwise generation (one call per step, "\\n\\n" stop) against one-shot generation
  of solutions for the same problems with the same model (ratio; target ≤ 1.2×);
- wall time of routing the test split live with the main job's exported router (the async
  engine over the tiny models' answer streams, decision 97; and, for comparison, over step
  calls) against one-shot generation of the same answers: every small answer whole and the
  escalated ones' large-model rests, one batched call each (ratio; target ≤ 1.1×).

    python -m launch.benchmark_tinylm [--problems=250]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from absl import flags

from generation import main_job
from generation.backends.base import StepRequest
from generation.live import online, rules
from generation.tinylm import backend as tiny
from generation.tinylm import scorers, task
from generation.traces import tracegen
from jaxroute import export
from launch import common
from launch.results import save

_N = flags.DEFINE_integer("problems", 250, "Test problems.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_ROUTER = flags.DEFINE_string("router", "runs/experiment/router", "Exported router for the live "
                              "routing row (the main job's; skipped when absent).")


class _StepCalls:
    """A model without `astream`: the engine asks it step by step (`generate`)."""

    def __init__(self, inner):
        self.inner, self.name, self.params = inner, inner.name, inner.params

    def generate(self, reqs, *, whole=False, max_tokens=1024):
        return self.inner.generate(reqs, whole=whole, max_tokens=max_tokens)


def live_vs_one_shot(test, small, large, router_dir: str, seed: int) -> dict[str, float]:
    """Median wall seconds (5 alternating runs after a warm-up) of routing `test` live — over
    answer streams and over step calls — and of one-shot generation of the same answers."""
    rule = rules.RouterRule(export.load_router(router_dir))
    cfg = online.OnlineConfig(seed=seed, **main_job.GEN_CONFIG)

    def live(backends):
        engine = online.Engine(backends, rule, cfg)
        lives = [engine.admit(p) for p in test]
        engine.run()
        return lives

    lives = live([small, large])
    small_reqs = [StepRequest(p.problem_id, p.question, (), (),
                              tracegen.stream_seed(p.problem_id, 0, seed)) for p in test]
    rests = [StepRequest(s.problem.problem_id, s.problem.question, tuple(s.steps), None,
                         tracegen.stream_seed(s.problem.problem_id, 1, seed))
             for s in lives if s.final_text is not None]
    limit = main_job.GEN_CONFIG["max_tokens_per_solution"]

    def one_shot():
        small.generate(small_reqs, whole=True, max_tokens=limit)
        if rests:
            large.generate(rests, whole=True, max_tokens=limit)

    stepwise = [_StepCalls(small), _StepCalls(large)]
    runs = {"streams": lambda: live([small, large]), "steps": lambda: live(stepwise),
            "one_shot": one_shot}
    for fn in runs.values():  # warm-up: every shape compiled before the clock starts
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(5):
        for k, fn in runs.items():
            small.clear_prefix_cache()
            large.clear_prefix_cache()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["escalated"] = len(rests) / len(test)
    return out


def main(argv):
    del argv
    test = [p.problem for p in task.generate(_N.value, _SEED.value, "test")]
    small, large = tiny.load("small"), tiny.load("large")
    q = main_job.quality(test, small, large, scorers.load_prm(), _SEED.value)
    acc = q["accuracy"]
    print(f"one-shot accuracy: small {acc[small.name]:.1f} %, large {acc[large.name]:.1f} %; "
          f"small-only coverage {q['coverage']:.3f}; PRM AUROC {q['prm_auroc']:.3f}")
    reqs = [StepRequest(p.problem_id, p.question, (), None, _SEED.value + i)
            for i, p in enumerate(test)]
    # Warm-up runs on the same problems compile every bucketed shape both paths use; the timed
    # runs then measure steady-state generation, not XLA compilation.
    main_job.stepwise_solutions(small, test, _SEED.value)
    small.generate(reqs, whole=True, max_tokens=160)
    t_step, t_one = [], []
    for _ in range(5):  # medians of 5 alternating runs: single runs vary by ±20 % here
        small.clear_prefix_cache()  # each stepwise run starts cold, like a new batch of problems
        t0 = time.perf_counter()
        main_job.stepwise_solutions(small, test, _SEED.value)
        t_step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        small.generate(reqs, whole=True, max_tokens=160)
        t_one.append(time.perf_counter() - t0)
    t_step, t_one = float(np.median(t_step)), float(np.median(t_one))
    routed = None
    if (Path(_ROUTER.value) / "router.json").exists():
        routed = live_vs_one_shot(test, small, large, _ROUTER.value, _SEED.value)
        print(f"routing live {routed['streams']:.2f} s (step calls {routed['steps']:.2f} s) vs "
              f"one-shot {routed['one_shot']:.2f} s → {routed['streams'] / routed['one_shot']:.2f}×"
              " (target ≤ 1.1×)")
    print(f"stepwise generation {t_step:.2f} s vs one-shot {t_one:.2f} s → "
          f"{t_step / t_one:.2f}× (target ≤ 1.2×)")
    gap = acc[large.name] - acc[small.name]
    rows = [["one-shot accuracy: small / large",
             f"{acc[small.name]:.1f} % / {acc[large.name]:.1f} % (gap {gap:.1f} points)",
             "gap 8–15 points, large ≥ 90 %"],
            ["small-only coverage (of the large model's right answers)",
             f"{q['coverage']:.3f}", "≥ 0.80"],
            ["small model, stepwise accuracy", f"{q['stepwise_accuracy']:.1f} %", "–"]]
    for name, a in q["aurocs"].items():
        rows.append([f"{name}: AUROC for a wrong step ({q['steps']} steps, "
                     f"{q['wrong_share']:.1%} wrong) / for an uncovered continuation "
                     f"({q['uncovered_share']:.1%})",
                     f"{a['wrong_step']:.3f} / {a['uncovered']:.3f}", "–"])
    rows += [[f"stand-in PRM: AUROC for a right step on {q['prm_steps']} held-out steps",
              f"{q['prm_auroc']:.3f}", "≥ 0.85"],
             ["stepwise vs one-shot wall time (median of 5)",
              f"{t_step:.2f} s vs {t_one:.2f} s = {t_step / t_one:.2f}×", "≤ 1.2×"]]
    if routed is not None:
        rows.append([f"routing the test split live ({routed['escalated']:.0%} escalated) vs "
                     "one-shot generation of the same answers (median of 5): over answer "
                     "streams / over step calls",
                     f"{routed['streams']:.2f} s / {routed['steps']:.2f} s vs "
                     f"{routed['one_shot']:.2f} s = {routed['streams'] / routed['one_shot']:.2f}× "
                     f"/ {routed['steps'] / routed['one_shot']:.2f}×", "≤ 1.1× (streams)"])
    save("tinylm", f"Embedded tiny LMs on {len(test)} test problems of the task",
         ["quantity", "measured", "target"], rows,
         extra={"stepwise_ratio": t_step / t_one, "quality": q, "routed": routed})


if __name__ == "__main__":
    common.run(main)
