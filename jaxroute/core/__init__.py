"""jaxroute.core: the reusable math kernels of threshold-constrained policy optimisation.

Depends only on jax, chex and numpy (no flax, optax, orbax, no LLM client): import it on its own
in any JAX project. Every public function checks ranks and shapes with chex at its entry and is
pure, jittable and vmappable. Arrays are batch-major `[B, T]` with a validity mask where time is
involved; shapes and units are in each docstring.

- V-trace (Sec. 4.1, IMPALA): `vtrace_targets`, `episodic_discounts`, `terminal_indicator`.
- Π_{π,κ}, S, softmask S̃, eq. 6, IS weights: `action_set`, `set_behaviour`, `log_softmask`,
  `route` (`route_rule`, `escalation_score`: eq. 6 for any array namespace),
  `log_clipped_weights`, `coverage_estimate`.
- Fisher-vector products: `make_fvp`, `make_ggn_fvp`, `categorical_kl`, and the categorical-KL
  trust region's `categorical_kl_fvp`; CG: `conjugate_gradient`.
- Eq. 4 (CPO trust-region step): `cpo_step` (= `cpo_dual` + `cpo_direction` + `line_search`).
- Eq. 5 (κ update) and the final calibration: `kappa_update`, `step_size`,
  `covered_by_verifier`, `conformal_threshold` (marginal), `ltt_threshold` (PAC, Learn then
  Test, with `binomial_cdf`), `min_calibration_size`.
"""

from jaxroute.core.calibration import (
    binomial_cdf,
    conformal_threshold,
    covered_by_verifier,
    kappa_update,
    ltt_threshold,
    min_calibration_size,
    step_size,
)
from jaxroute.core.cg import CGResult, conjugate_gradient
from jaxroute.core.cpo import (
    CPODual,
    CPOInfo,
    LineSearchResult,
    cpo_direction,
    cpo_dual,
    cpo_step,
    line_search,
)
from jaxroute.core.fisher import (
    categorical_kl,
    categorical_kl_fvp,
    flatten,
    make_fvp,
    make_ggn_fvp,
)
from jaxroute.core.threshold import (
    action_set,
    coverage_estimate,
    escalation_in_set,
    escalation_score,
    log_clipped_weights,
    log_softmask,
    masked_log_softmax,
    route,
    route_rule,
    set_behaviour,
    valid_actions,
)
from jaxroute.core.vtrace import (
    VTraceOutput,
    episodic_discounts,
    terminal_indicator,
    vtrace_targets,
)

__all__ = [
    "CGResult",
    "CPODual",
    "CPOInfo",
    "LineSearchResult",
    "VTraceOutput",
    "action_set",
    "categorical_kl",
    "categorical_kl_fvp",
    "binomial_cdf",
    "conformal_threshold",
    "ltt_threshold",
    "min_calibration_size",
    "conjugate_gradient",
    "coverage_estimate",
    "covered_by_verifier",
    "cpo_direction",
    "cpo_dual",
    "cpo_step",
    "episodic_discounts",
    "escalation_in_set",
    "escalation_score",
    "flatten",
    "kappa_update",
    "line_search",
    "log_clipped_weights",
    "log_softmask",
    "make_fvp",
    "make_ggn_fvp",
    "masked_log_softmax",
    "route",
    "route_rule",
    "set_behaviour",
    "step_size",
    "terminal_indicator",
    "valid_actions",
    "vtrace_targets",
]
