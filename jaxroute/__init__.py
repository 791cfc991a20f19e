"""jaxroute: policy-guided stepwise routing between small and large LLMs, in JAX.

The training core is pure JAX and does no I/O beyond checkpoint and trace files; LLM clients live
in the `generation` package, launch scripts in `launch`.
"""

from jaxroute import (
    baselines,
    calibration,
    cg,
    cpo,
    env,
    evaluate,
    export,
    fisher,
    networks,
    synthetic,
    tcpo,
    threshold,
    trace,
    trainer,
    vtrace,
)
from jaxroute.calibration import conformal_threshold, kappa_update
from jaxroute.cg import conjugate_gradient
from jaxroute.cpo import cpo_direction, cpo_dual, line_search
from jaxroute.networks import Normalizer, make_networks
from jaxroute.tcpo import Rollout, TCPOConfig, TrainState, init_state, make_update
from jaxroute.threshold import route
from jaxroute.vtrace import vtrace as vtrace_targets

__all__ = [
    "Normalizer",
    "baselines",
    "env",
    "evaluate",
    "export",
    "synthetic",
    "trace",
    "trainer",
    "Rollout",
    "TCPOConfig",
    "TrainState",
    "calibration",
    "cg",
    "conformal_threshold",
    "conjugate_gradient",
    "cpo",
    "cpo_direction",
    "cpo_dual",
    "fisher",
    "init_state",
    "kappa_update",
    "line_search",
    "make_networks",
    "make_update",
    "networks",
    "route",
    "tcpo",
    "threshold",
    "vtrace",
    "vtrace_targets",
]
