"""CPO: the closed-form dual against a brute-force QCQP solver, closed-form special cases, line search."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from jaxroute.core import cpo

DELTA = 0.01


def random_problem(rng, n=4, binding=False):
    m = rng.normal(size=(n, n))
    h = m @ m.T + 0.3 * np.eye(n)
    g = rng.normal(size=n)
    b = -g + 0.5 * rng.normal(size=n) if binding else rng.normal(size=n)
    c = rng.uniform(-0.15, 0.1)
    return h, g, b, c


def closed_form(h, g, b, c, delta=DELTA):
    v, w = np.linalg.solve(h, g), np.linalg.solve(h, b)
    q, r, s = g @ v, g @ w, b @ w
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    dual = cpo.cpo_dual(f32(q), f32(r), f32(s), f32(c), delta, f32(b @ b))
    x = np.asarray(cpo.cpo_direction(f32(v), f32(w), dual), np.float64)
    return x, dual


def brute_force(h, lin, c_lin, delta=DELTA, constrained=True, starts=8, seed=0):
    """min linᵀx s.t. ½xᵀHx ≤ δ (and b x + c ≤ 0 if constrained) by multi-start SLSQP."""
    b, c = c_lin if constrained else (None, None)
    cons = [{"type": "ineq", "fun": lambda x: delta - 0.5 * x @ h @ x,
             "jac": lambda x: -(h @ x)}]
    if constrained:
        cons.append({"type": "ineq", "fun": lambda x: -(b @ x + c), "jac": lambda x: -b})
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        x0 = rng.normal(size=len(lin)) * 0.01
        res = minimize(lambda x: lin @ x, x0, jac=lambda x: lin, constraints=cons,
                       method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
        feas = all(con["fun"](res.x) >= -1e-7 for con in cons)
        if feas and (best is None or lin @ res.x < lin @ best):
            best = res.x
    return best


def test_closed_form_equals_brute_force_qcqp():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(160):
        h, g, b, c = random_problem(rng, binding=i % 2 == 0)
        x, dual = closed_form(h, g, b, c)
        case = int(dual.case)
        seen.add(case)
        if case == 0:
            continue  # no feasible point: tested separately as the recovery step
        ref = brute_force(h, g, (b, c), seed=i)
        assert ref is not None
        # Same optimal value and point; trust region and constraint satisfied.
        np.testing.assert_allclose(g @ x, g @ ref, rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(x, ref, atol=2e-3 * max(1.0, np.abs(ref).max()))
        assert 0.5 * x @ h @ x <= DELTA * (1 + 1e-3)
        assert b @ x + c <= 1e-4
    assert {1, 2, 3} <= seen, seen


def test_trpo_cases_equal_closed_form():
    rng = np.random.default_rng(1)
    for i in range(20):
        h, g, b, _ = random_problem(rng)
        v = np.linalg.solve(h, g)
        trpo = -np.sqrt(2 * DELTA / (g @ v)) * v
        # Case 3: deeply feasible (c ≪ 0) so the whole trust region satisfies the constraint.
        x, dual = closed_form(h, g, b, -10.0)
        assert int(dual.case) == 3
        np.testing.assert_allclose(x, trpo, rtol=1e-4, atol=1e-6)
        # Case 4: vanishing constraint gradient while feasible.
        x4, dual4 = closed_form(h, g, np.zeros_like(b), -0.1)
        assert int(dual4.case) == 4
        np.testing.assert_allclose(x4, trpo, rtol=1e-4, atol=1e-6)
        ref = brute_force(h, g, None, constrained=False, seed=i)
        np.testing.assert_allclose(g @ trpo, g @ ref, rtol=1e-3)


def test_recovery_case_is_pure_constraint_descent():
    rng = np.random.default_rng(2)
    for i in range(20):
        h, g, b, _ = random_problem(rng)
        w = np.linalg.solve(h, b)
        c = 1.0 + np.sqrt(2 * DELTA * (b @ w))  # no feasible point inside the trust region
        x, dual = closed_form(h, g, b, c)
        assert int(dual.case) == 0
        np.testing.assert_allclose(x, -np.sqrt(2 * DELTA / (b @ w)) * w, rtol=1e-4, atol=1e-7)
        # It is the steepest decrease of bᵀx in the trust region.
        ref = brute_force(h, b, None, constrained=False, seed=i)
        np.testing.assert_allclose(b @ x, b @ ref, rtol=1e-3)
        assert b @ x < 0


def test_positive_scaling_of_g_leaves_step_unchanged():
    rng = np.random.default_rng(3)
    for _i in range(30):
        h, g, b, c = random_problem(rng, binding=True)
        x1, d1 = closed_form(h, g, b, c)
        x2, d2 = closed_form(h, 7.0 * g, b, c)
        assert int(d1.case) == int(d2.case)
        np.testing.assert_allclose(x1, x2, rtol=1e-3, atol=1e-6)


def test_degenerate_and_nonfinite_inputs_give_finite_or_zero_steps():
    z = jnp.float32(0.0)
    for q, r, s, c, bb in [(0, 0, 0, -0.1, 0), (0, 0, 0, 0.1, 0), (1, 0, 0, 0, 0), (0, 0, 1, 0, 1)]:
        dual = cpo.cpo_dual(jnp.float32(q), jnp.float32(r), jnp.float32(s), jnp.float32(c),
                            DELTA, jnp.float32(bb))
        assert np.isfinite(dual.lam) and np.isfinite(dual.nu)
        x = cpo.cpo_direction(jnp.ones(3), jnp.ones(3), dual)
        assert np.all(np.isfinite(x))
    bad = cpo.cpo_dual(jnp.float32(np.nan), z, z, z, DELTA, z)
    assert int(bad.case) == -1
    np.testing.assert_array_equal(cpo.cpo_direction(jnp.ones(3), jnp.ones(3), bad), 0.0)


def quadratic_eval(h, g, b):
    h, g, b = (jnp.asarray(a, jnp.float32) for a in (h, g, b))
    return lambda x: (0.5 * x @ h @ x, g @ x, b @ x)


def test_line_search_rejects_everything_keeps_old_params():
    rng = np.random.default_rng(4)
    h, g, b, _ = random_problem(rng)
    step = jnp.asarray(np.ones(4) * 10.0, jnp.float32)  # far outside any trust region
    res = cpo.line_search(quadratic_eval(h, g, b), step, case=jnp.int32(2), c=jnp.float32(-0.1),
                          objective_old=0.0, constraint_old=0.0, max_kl=1e-6)
    assert not res.accepted and float(res.fraction) == 0.0
    np.testing.assert_array_equal(res.step, 0.0)
    # A non-finite evaluation is never accepted.
    nan_eval = lambda x: (jnp.nan * x.sum(), x.sum(), x.sum())  # noqa: E731
    res = cpo.line_search(nan_eval, step, case=jnp.int32(3), c=jnp.float32(-1.0),
                          objective_old=1e9, constraint_old=1e9, max_kl=1e9)
    assert not res.accepted


@pytest.mark.parametrize("case", [1, 2, 3])
def test_line_search_accepts_first_admissible_fraction(case):
    rng = np.random.default_rng(5 + case)
    h, g, b, c = random_problem(rng, binding=True)
    x, dual = closed_form(h, g, b, c)
    full = jnp.asarray(4.0 * x, jnp.float32)  # overshoot: the first candidates break the TR
    ev = quadratic_eval(h, g, b)
    res = cpo.line_search(ev, full, case=jnp.int32(case), c=jnp.float32(c),
                          objective_old=0.0, constraint_old=0.0, max_kl=DELTA)
    fracs = 0.8 ** np.arange(10)
    ok = []
    for f in fracs:
        kl, obj, con = (float(t) for t in ev(f * full))
        ok.append(kl <= DELTA and (obj <= 0 or case <= 1) and con <= max(-c, 0.0))
    if any(ok):
        j = int(np.argmax(ok))
        assert res.accepted
        np.testing.assert_allclose(res.fraction, fracs[j], rtol=1e-6)
        kl, _, _ = ev(res.step)
        assert float(kl) <= DELTA
    else:
        assert not res.accepted


# ------------------------------------------------------------------------------------------------
# Eq. 4 as one kernel: `cpo_step` against the dense QCQP solution, on every case


def _step(h, g, b, c, delta=DELTA):
    h32 = jnp.asarray(h, jnp.float32)
    step, info = cpo.cpo_step(jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32),
                              jnp.float32(c), lambda v: h32 @ v, None, max_kl=delta,
                              cg_iters=20, cg_tol=0.0)
    return np.asarray(step, np.float64), info


def _scaled_brute_force(h, g, b, c, seed):
    """The dense optimum with the linear constraint divided by |b| (SLSQP's tolerances are
    absolute; an unscaled |b| = 1e-4 constraint would be satisfied by anything)."""
    nb = np.linalg.norm(b)
    return brute_force(h, g, (b / nb, c / nb), seed=seed)


def test_cpo_step_equals_the_dense_qcqp_solution_on_every_case():
    rng = np.random.default_rng(11)
    seen = set()
    for i in range(60):
        h, g, _, _ = random_problem(rng)
        scale = 10.0 ** rng.uniform(-4, 0)  # |b| from 1e-4 to 1 (decision 62)
        direction = -g + 0.5 * rng.normal(size=4) if i % 2 else rng.normal(size=4)
        b = scale * direction / np.linalg.norm(direction)
        s = b @ np.linalg.solve(h, b)
        # c spread around the trust region's reach √(2δs), so cases 0-3 all occur at every |b|.
        c = rng.uniform(-2.0, 2.0) * np.sqrt(2 * DELTA * s)
        x, info = _step(h, g, b, c)
        case = int(info.case)
        seen.add(case)
        if case == 0:  # no feasible point: the steepest decrease of bᵀx in the trust region
            ref = brute_force(h, b / np.linalg.norm(b), None, constrained=False, seed=i)
            np.testing.assert_allclose(x, ref, atol=2e-3 * np.abs(ref).max())
        else:
            ref = _scaled_brute_force(h, g, b, c, seed=i)
            assert ref is not None
            np.testing.assert_allclose(g @ x, g @ ref, rtol=2e-3, atol=2e-5)
            np.testing.assert_allclose(x, ref, atol=3e-3 * max(1.0, np.abs(ref).max()))
        # Never outside the trust region; never across the linearised constraint when a
        # feasible point exists (relative to the constraint's own scale).
        assert 0.5 * x @ h @ x <= DELTA * (1 + 2e-3), (i, case, 0.5 * x @ h @ x / DELTA)
        if case in (1, 2, 3, 4):
            assert (b @ x + c) / np.linalg.norm(b) <= 1e-4 * max(1.0, np.abs(x).max()), (i, case)
    assert {0, 1, 2, 3} <= seen, seen
    # Case 4: a vanishing constraint gradient while feasible is the TRPO step.
    h, g, _, _ = random_problem(rng)
    x, info = _step(h, g, np.zeros(4), -0.1)
    v = np.linalg.solve(h, g)
    assert int(info.case) == 4
    np.testing.assert_allclose(x, -np.sqrt(2 * DELTA / (g @ v)) * v, rtol=1e-4, atol=1e-6)


def test_cpo_step_is_dual_direction_then_line_search():
    rng = np.random.default_rng(12)
    h, g, b, c = random_problem(rng, binding=True)
    ev = quadratic_eval(h, g, b)
    h32 = jnp.asarray(h, jnp.float32)
    args = (jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32), jnp.float32(c),
            lambda v: h32 @ v)
    full, info_full = cpo.cpo_step(*args, None, max_kl=DELTA)
    x, dual = closed_form(h, g, b, c)
    assert int(info_full.case) == int(dual.case)
    np.testing.assert_allclose(np.asarray(full), x, rtol=1e-4, atol=1e-6)
    step, info = cpo.cpo_step(*args, ev, max_kl=DELTA)
    res = cpo.line_search(ev, full, case=dual.case, c=jnp.float32(c), objective_old=0.0,
                          constraint_old=0.0, max_kl=DELTA)
    assert bool(info.accepted) == bool(res.accepted) and float(info.fraction) == float(res.fraction)
    np.testing.assert_array_equal(np.asarray(step), np.asarray(res.step))


def test_cpo_step_refuses_bad_shapes():
    with pytest.raises(AssertionError):
        cpo.cpo_step(jnp.ones(3), jnp.ones(4), jnp.float32(0.0), lambda v: v, None, max_kl=0.01)
