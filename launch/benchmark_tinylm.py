"""Measurements of the embedded default (issue: tiny LMs), in one run on this machine:

- small-only and large-only accuracy on the built-in test split (one-shot solutions);
- how well S_os predicts a wrong step: AUROC of −S_os against the rule verifier's labels on the
  small model's stepwise trajectories;
- wall time of stepwise generation (one call per step, "\\n\\n" stop) against one-shot generation
  of solutions for the same problems with the same model (ratio; target ≤ 1.2×).

    python -m launch.benchmark_tinylm [--problems=250]
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from generation.backends.base import StepRequest
from generation.tinylm import backend as tiny
from generation.tinylm import task
from generation.traces import features
from generation.traces.answers import extract_boxed
from jaxroute import stats
from launch import common
from launch.results import save

_N = flags.DEFINE_integer("problems", 250, "Test problems.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")


def stepwise(be, problems, seed, max_steps=8):
    steps = [[] for _ in problems]
    results = [[] for _ in problems]
    live = list(range(len(problems)))
    for t in range(max_steps):
        if not live:
            break
        reqs = [StepRequest(f"{i}/{t}", problems[i].question, tuple(steps[i]),
                            tuple(x for r in results[i] for x in r.token_ids), seed + i * 100 + t)
                for i in live]
        outs = be.generate(reqs, max_tokens=64)
        nxt = []
        for i, r in zip(live, outs, strict=True):
            steps[i].append(r.text)
            results[i].append(r)
            if not r.is_final:
                nxt.append(i)
        live = nxt
    return steps, results


def main(argv):
    del argv
    test = [p.problem for p in task.generate(_N.value, _SEED.value, "test")]
    small, large = tiny.load("small"), tiny.load("large")
    reqs = [StepRequest(p.problem_id, p.question, (), None, _SEED.value + i)
            for i, p in enumerate(test)]
    one_shot = {}
    for be in (small, large):
        be.generate(reqs[:8], whole=True, max_tokens=160)  # compile
        outs = be.generate(reqs, whole=True, max_tokens=160)
        acc = np.mean([extract_boxed(o.text) == p.gold for o, p in zip(outs, test, strict=True)])
        one_shot[be.name] = 100 * acc
        print(f"{be.name}: one-shot accuracy {100 * acc:.1f}% ({be.params:,.0f} parameters)")

    # Warm-up runs on the same problems compile every bucketed shape both paths use; the timed
    # runs then measure steady-state generation, not XLA compilation.
    stepwise(small, test, _SEED.value)
    small.generate(reqs, whole=True, max_tokens=160)
    t_step, t_one = [], []
    for _ in range(5):  # medians of 5 alternating runs: single runs vary by ±20 % here
        small.clear_prefix_cache()  # each stepwise run starts cold, like a new batch of problems
        t0 = time.perf_counter()
        steps, results = stepwise(small, test, _SEED.value)
        t_step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        small.generate(reqs, whole=True, max_tokens=160)
        t_one.append(time.perf_counter() - t0)
    t_step, t_one = float(np.median(t_step)), float(np.median(t_one))
    acc = np.mean([extract_boxed(s[-1] if s else "") == p.gold
                   for s, p in zip(steps, test, strict=True)])
    print(f"small stepwise accuracy {100 * acc:.1f}%")
    print(f"stepwise generation {t_step:.2f} s vs one-shot {t_one:.2f} s → "
          f"{t_step / t_one:.2f}× (target ≤ 1.2×)")

    scores, labels = [], []
    for rs in results:
        state = features.MathSpanState()
        for r in rs:
            ok = task.check_step(r.text)
            mask, state = features.math_mask(r.tokens, state)
            if ok is None or not r.tokens:
                continue
            scores.append(-features.s_os(np.asarray(r.confidence), mask).value)
            labels.append(not ok)
    scores, labels = np.asarray(scores), np.asarray(labels)
    auc = stats.auroc(scores, labels)
    print(f"S_os as a wrong-step detector: AUROC {auc:.3f} over {len(labels)} "
          f"steps ({labels.mean():.1%} wrong) (target ≥ 0.65)")
    save("tinylm", f"Embedded tiny LMs on {len(test)} test problems of the task",
                 ["quantity", "measured", "target"],
                 [["one-shot accuracy: small / large",
                   f"{one_shot[small.name]:.1f} % / {one_shot[large.name]:.1f} %",
                   "large ≥ small + 15, small ≥ 30 %"],
                  ["small model, stepwise accuracy", f"{100 * acc:.1f} %", "–"],
                  [f"S_os as a wrong-step detector ({len(labels)} steps, {labels.mean():.1%} "
                   "wrong)", f"AUROC {auc:.3f}", "≥ 0.65"],
                  ["stepwise vs one-shot wall time (median of 5)",
                   f"{t_step:.2f} s vs {t_one:.2f} s = {t_step / t_one:.2f}×", "≤ 1.2×"]],
         extra={"stepwise_ratio": t_step / t_one})


if __name__ == "__main__":
    common.run(main)
