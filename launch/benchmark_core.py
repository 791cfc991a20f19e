"""Benchmark of one TCPO training iteration (`jaxroute.tcpo.make_update`).

Measures, in one run and on this machine: compile time, the time of one jitted iteration after
compile, and the same iteration run op by op (`jax.disable_jit`) as the baseline, at the paper's
scale (batch 5, T = 32, 2×64 MLPs — and 3×64 for the other reading of "three-layer") and at
batch 256. Prints a table; ratios are against the op-by-op run measured here.

    python -m launch.benchmark_core [--repeats=200]
"""

from __future__ import annotations

import time

import jax
from absl import flags

from jaxroute import networks, tcpo
from jaxroute.synthetic import synthetic_rollout
from launch import common
from launch.results import save

_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed jitted iterations per configuration.")
_EAGER_REPEATS = flags.DEFINE_integer("eager_repeats", 3, "Timed op-by-op iterations.")
_FEATURES = flags.DEFINE_integer("features", 5, "Number of step features D.")


def measure(b: int, t: int, hidden: tuple[int, ...], repeats: int, eager_repeats: int, d: int):
    nets = networks.make_networks(2, d, hidden=hidden)
    cfg = tcpo.TCPOConfig()
    state = tcpo.init_state(nets, cfg, jax.random.PRNGKey(0))
    batch = synthetic_rollout(0, b, t, d)
    key = jax.random.PRNGKey(1)
    update = tcpo.make_update(nets, cfg)

    start = time.perf_counter()
    compiled = update.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, batch, key))  # warm-up
    start = time.perf_counter()
    out = None
    for _ in range(repeats):
        out = compiled(state, batch, key)
    jax.block_until_ready(out)
    jit_ms = (time.perf_counter() - start) / repeats * 1e3

    with jax.disable_jit():
        jax.block_until_ready(update(state, batch, key))  # warm-up of the op caches
        start = time.perf_counter()
        for _ in range(eager_repeats):
            out = update(state, batch, key)
        jax.block_until_ready(out)
    eager_ms = (time.perf_counter() - start) / eager_repeats * 1e3
    return compile_s, jit_ms, eager_ms


def main(argv):
    del argv
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{jax.local_device_count()} device(s)")
    rows = []
    for b, t, hidden in [(5, 32, (64, 64)), (5, 32, (64, 64, 64)), (256, 32, (64, 64))]:
        compile_s, jit_ms, eager_ms = measure(b, t, hidden, _REPEATS.value, _EAGER_REPEATS.value,
                                              _FEATURES.value)
        rows.append((b, t, "x".join(map(str, hidden)), compile_s, jit_ms, eager_ms))
    print(f"\n{'batch':>5} {'T':>3} {'mlp':>9} {'compile s':>10} {'jit ms/iter':>12} "
          f"{'op-by-op ms':>12} {'speed-up':>9}")
    for b, t, h, c, j, e in rows:
        print(f"{b:>5} {t:>3} {h:>9} {c:>10.2f} {j:>12.3f} {e:>12.1f} {e / j:>8.0f}x")
    print("\nTarget: ≤ 5 ms per jitted iteration at batch 5, T = 32 on 2 CPU cores.")
    save("core", "One jitted TCPO iteration (`tcpo.make_update`) vs the same iteration "
                 "op by op", ["batch", "T", "MLP", "compile s", "jitted ms/iteration",
                              "op-by-op ms", "speed-up"],
                 [[b, t, h, c, j, e, f"{e / j:.0f}×"] for b, t, h, c, j, e in rows],
                 notes="Target: ≤ 5 ms per jitted iteration at batch 5, T = 32.")


if __name__ == "__main__":
    common.run(main)
