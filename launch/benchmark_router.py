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
from absl import flags

from generation.backends.base import StepRequest
from generation.tinylm import backend as tiny
from generation.tinylm import task
from generation.traces import features
from jaxroute import export
from jaxroute import networks as nets_lib
from launch import common
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
        router = export.load_router(_ROUTER.value)
        features.check_known(router.meta["feature_names"], _ROUTER.value)
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
    rows, t_one = [], None
    for n in (1, 4, 16, 64, 256, 1024):
        f = rng.normal(size=(n, len(router.meta["feature_names"]))).astype(np.float32)
        m = np.zeros(n, np.int32)
        host = timed(lambda f=f, m=m: router.decide(f, m, path="host"), _REPEATS.value)
        jit = timed(lambda f=f, m=m: router.decide(f, m, path="device"), _REPEATS.value)
        served = timed(lambda f=f, m=m: router.decide(f, m), _REPEATS.value)
        rows.append([n, f"{1e6 * host:.1f}", f"{1e6 * jit:.1f}", f"{1e6 * served:.1f}",
                     "host" if host < jit else "jit"])
        if n == 1:
            t_one = served
        print(f"batch {n:5d}: host {1e6 * host:8.1f} µs, jitted {1e6 * jit:8.1f} µs, "
              f"Router.decide {1e6 * served:8.1f} µs")
    crossover = next((r[0] for r in rows if r[4] == "jit"), None)
    small = tiny.load("small")
    probs = [p.problem for p in task.generate(b, 0, "test")]
    reqs = [StepRequest(p.problem_id, p.question, (), (), i) for i, p in enumerate(probs)]
    s_one = timed(lambda: small.generate(reqs[:1], max_tokens=64), 20)
    print(f"small tiny LM step, 1 problem: {1e3 * s_one:.3f} ms "
          f"(decision = {t_one / s_one:.2%} of a step)")
    save("router", f"Exported router decision (eq. 6): numpy on the host vs one jitted call "
         f"(median of {_REPEATS.value}, warm, µs per call)",
         ["problems", "host (numpy)", "jitted", "Router.decide", "faster"], rows,
         notes=f"Target: ≤ 50 µs for one problem. Router.decide uses the host path up to "
               f"{export.HOST_BATCH} problems; measured crossover: "
               f"{crossover if crossover else '> 1024'} problems. One step of the small tiny "
               f"LM (one problem, ≤ 64 tokens) takes {1e3 * s_one:.2f} ms: the decision is "
               f"{t_one / s_one:.2%} of it.",
         extra={"one_problem_us": 1e6 * t_one})


if __name__ == "__main__":
    common.run(main)
