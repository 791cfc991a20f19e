"""Decision latency of an exported router against the time of one small-model step.

    python -m launch.benchmark_router [--router=runs/experiment/router]

Measures on this machine, in one run: `Router.decide` for one decision and for a batch (jitted,
warm), against the built-in small tiny LM writing one step for one problem and for a batch of the
same size (warm, KV cache). Without --router it exports a freshly initialised router of the
default shape (the latency does not depend on the weights).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from generation import features
from generation.backend import StepRequest
from generation.tinylm import backend as tiny
from generation.tinylm import task
from jaxroute import export
from jaxroute import networks as nets_lib
from launch.results import save

_ROUTER = flags.DEFINE_string("router", None, "Exported router folder (default: a fresh one).")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size of the batched measurements.")
_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed repetitions of a decision.")


def timed(fn, repeats: int) -> float:
    """Median seconds per call of `fn` (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv):
    del argv
    if _ROUTER.value:
        router = export.load_router(_ROUTER.value, feature_names=features.FEATURE_NAMES)
    else:
        nets = nets_lib.make_networks(2, len(features.FEATURE_NAMES), (64, 64))
        params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(0))
        d = len(features.FEATURE_NAMES)
        norm = nets_lib.Normalizer(np.zeros(d, np.float32), np.ones(d, np.float32))
        path = Path(tempfile.mkdtemp()) / "router"
        export.export_router(path, nets, params, norm, 0.5, feature_names=features.FEATURE_NAMES,
                             model_names=["small", "large"], alpha=0.05, hidden=(64, 64))
        router = export.load_router(path)
    b = _BATCH.value
    rng = np.random.default_rng(0)
    one_f = rng.normal(size=(1, 5)).astype(np.float32)
    many_f = rng.normal(size=(b, 5)).astype(np.float32)
    one_m, many_m = np.zeros(1, np.int32), np.zeros(b, np.int32)
    t_one = timed(lambda: np.asarray(router.decide(one_f, one_m)), _REPEATS.value)
    t_many = timed(lambda: np.asarray(router.decide(many_f, many_m)), _REPEATS.value)

    small = tiny.load("small")
    probs = [p.problem for p in task.generate(b, 0, "test")]
    reqs = [StepRequest(p.problem_id, p.question, (), (), i) for i, p in enumerate(probs)]
    s_one = timed(lambda: small.generate(reqs[:1], max_tokens=64), 20)
    s_many = timed(lambda: small.generate(reqs, max_tokens=64), 10)
    print(f"router decision, 1 problem:      {1e3 * t_one:8.3f} ms")
    print(f"router decision, {b} problems:   {1e3 * t_many:8.3f} ms")
    print(f"small tiny LM step, 1 problem:   {1e3 * s_one:8.3f} ms  "
          f"(decision = {t_one / s_one:.2%} of a step)")
    print(f"small tiny LM step, {b} problems: {1e3 * s_many:8.3f} ms  "
          f"(decision = {t_many / s_many:.2%} of a step)")
    save("router", "Exported router decision (eq. 6) vs one small tiny-LM step "
                 f"(medians over {_REPEATS.value} decisions / 20 and 10 steps, warm)",
                 ["measurement", "1 problem", f"{b} problems"],
                 [["router decision (`Router.decide`)", f"{1e3 * t_one:.3f} ms",
                   f"{1e3 * t_many:.3f} ms"],
                  ["small tiny LM writing one step (≤ 64 tokens)", f"{1e3 * s_one:.2f} ms",
                   f"{1e3 * s_many:.2f} ms"],
                  ["decision / step", f"{t_one / s_one:.2%}", f"{t_many / s_many:.2%}"]])


if __name__ == "__main__":
    app.run(main)
