"""Benchmark of the offline pipeline: a full training run, and evaluation throughput.

Measures in one run on this machine:
- wall time of a full training run at the paper's defaults (1000 iterations, batch 5, 2×64),
  compile included, against the same run's steady-state time per chunk;
- evaluation (eq. 6 replay) throughput on a 100 000-problem SYNTHETIC tree, against a plain
  Python replay of 1 000 of the same problems (baseline, extrapolated per problem);
- peak resident memory of the process.

    python -m launch.benchmark_offline [--eval_problems=100000]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxroute import env, synthetic, tcpo, trace, trainer
from launch import common
from launch.results import save

_TRAIN_PROBLEMS = flags.DEFINE_integer("train_problems", 1000, "Synthetic problems for training.")
_EVAL_PROBLEMS = flags.DEFINE_integer("eval_problems", 100_000, "Synthetic problems to evaluate.")


def python_replay(packed: trace.PackedTrees, actions: np.ndarray, n: int) -> float:
    """Seconds to replay the first n problems (root 0) with a plain Python loop."""
    start = time.perf_counter()
    for i in range(n):
        s, t, cost = 0, 0, float(packed.step_cost[i, 0, 0])
        while True:
            a = int(actions[i, s, t])
            if a == packed.seg_model[i, s]:
                if t + 1 >= packed.seg_len[i, s]:
                    break
                t += 1
                cost += float(packed.step_cost[i, s, t])
            else:
                cost += float(packed.branch_cost[i, s, t, a])
                break
    return time.perf_counter() - start


def time_training(packed: trace.PackedTrees, cfg: trainer.TrainConfig):
    """(seconds of a full training run, its steady-state estimate from the chunk times, the
    trained result)."""
    times = []
    start = time.perf_counter()
    res = trainer.train(packed, cfg, progress=lambda d, m: times.append(time.perf_counter()))
    total = time.perf_counter() - start
    chunk_s = np.diff(times)
    iters, batch = cfg.learner.iterations, cfg.learner.batch_size
    steady = float(np.median(chunk_s)) * iters / cfg.chunk if len(chunk_s) else total
    print(f"training, {iters} iterations (batch {batch}), compile and final "
          f"calibration included: {total:.1f} s (target ≤ 30 s); steady-state "
          f"{steady:.1f} s → compile/calibration overhead {total - steady:.1f} s")
    return total, steady, res


def main(argv):
    del argv
    common.large_blocks_outside_the_heap()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    _, packed = synthetic.generate_packed(synthetic.SyntheticConfig(
        num_problems=_TRAIN_PROBLEMS.value))
    cfg = trainer.TrainConfig(tcpo.TCPOConfig())  # the paper's TCPO: batch 5, 1000 iterations
    total, steady, res = time_training(packed, cfg)
    log_prob = res.log_prob_fn(0)

    t0 = time.perf_counter()
    # Packed as they are drawn: 100 000 problems as Python dicts would take gigabytes.
    _, big_packed = synthetic.generate_packed(synthetic.SyntheticConfig(
        num_problems=_EVAL_PROBLEMS.value, seed=1))
    print(f"generated and packed {_EVAL_PROBLEMS.value} synthetic problems in "
          f"{time.perf_counter() - t0:.1f} s")
    dev = env.to_device(big_packed)
    idx = np.arange(big_packed.num_problems)
    probs, roots = env.instances(big_packed, idx)

    def evaluate_all():
        sub = env.gather(dev, jnp.asarray(probs))
        acts = env.greedy_actions(log_prob, sub, jnp.float32(res.kappa))
        w = env.walk(dev, jnp.asarray(probs), jnp.asarray(roots), acts, env.horizon(big_packed))
        return acts, w

    acts, w = evaluate_all()  # compile
    jax.block_until_ready(w)
    start = time.perf_counter()
    acts, w = evaluate_all()
    jax.block_until_ready(w)
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(env.walk(dev, jnp.asarray(probs), jnp.asarray(roots), acts,
                                   env.horizon(big_packed)))
    walk_s = time.perf_counter() - start
    n_py = 10_000
    py_s = python_replay(big_packed, np.asarray(acts), n_py) * len(probs) / n_py
    print(f"evaluation of {len(probs)} instances (policy on every node + eq. 6 replay): "
          f"{eval_s:.2f} s (target ≤ 5 s), {len(probs) / eval_s:,.0f} problems/s")
    print(f"  of which the tree walk: {walk_s:.3f} s; a plain-Python walk of the same actions, "
          f"extrapolated from {n_py}: {py_s:.2f} s → the jitted walk is {py_s / walk_s:.1f}× "
          "faster")
    print(f"peak resident memory: {common.peak_rss_mb():,.0f} MiB")
    save("offline", "Offline training and evaluation on synthetic trees",
                 ["measurement", "result", "target"],
                 [[f"full training run, {cfg.learner.iterations} iterations × batch "
                   f"{cfg.learner.batch_size}, "
                   "compile + final calibration included", f"{total:.1f} s (steady state "
                   f"{steady:.1f} s)", "≤ 30 s"],
                  [f"evaluation of {len(probs):,} synthetic instances (policy on every node + "
                   "eq. 6 replay)", f"{eval_s:.2f} s ({len(probs) / eval_s:,.0f}/s)", "≤ 5 s"],
                  ["of which the jitted tree walk vs a plain-Python walk",
                   f"{walk_s:.3f} s vs {py_s:.2f} s ({py_s / walk_s:.1f}×)", "–"],
                  ["peak resident memory (whole run)", f"{common.peak_rss_mb():,.0f} MiB", "≤ 2048 MiB"]],
         extra={"peak_rss_mb": common.peak_rss_mb()})


if __name__ == "__main__":
    common.run(main)
