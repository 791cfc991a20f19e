"""Threshold policy: action sets, S, the softmask limit, eq. 6, IS weights and coverage."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.core import threshold as th


def random_probs(key, shape, k):
    return jax.nn.softmax(2.0 * jax.random.normal(key, shape + (k,)), axis=-1)


def test_action_set_definition_and_empty_rule():
    probs = jnp.array([[0.7, 0.3], [0.5, 0.5], [0.45, 0.55]])
    valid = jnp.ones((3, 2), bool)
    np.testing.assert_array_equal(th.action_set(probs, 0.4, valid),
                                  [[1, 0], [1, 1], [1, 1]])
    np.testing.assert_array_equal(th.action_set(probs, 0.0, valid), np.ones((3, 2)))
    # κ above every probability: the empty set becomes {argmax}.
    np.testing.assert_array_equal(th.action_set(probs, 0.9, valid), [[1, 0], [1, 0], [0, 1]])
    # Invalid actions never enter, even at κ = 0.
    three = jnp.array([[0.2, 0.3, 0.5]])
    np.testing.assert_array_equal(th.action_set(three, 0.0, th.valid_actions(jnp.array([1]), 3)),
                                  [[0, 1, 1]])


def test_set_behaviour_is_uniform_and_normalised():
    probs = random_probs(jax.random.PRNGKey(0), (50,), 4)
    valid = jnp.ones((50, 4), bool)
    for kappa in (0.0, 0.1, 0.3, 0.9):
        s = th.set_behaviour(probs, kappa, valid)
        np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-6)
        inset = np.asarray(th.action_set(probs, kappa, valid))
        np.testing.assert_allclose(s, inset / inset.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_softmask_limits(k):
    probs = random_probs(jax.random.PRNGKey(1), (200,), k)
    model = jnp.zeros(200, jnp.int32)
    valid = th.valid_actions(model, k)
    for kappa in (0.1, 0.3, 0.6, 0.95):
        log_s = th.log_softmask(probs, kappa, valid, eps=1e-4)
        assert np.all(np.isfinite(np.asarray(log_s)))
        s = np.exp(np.asarray(log_s))
        np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-5)
        hard = np.asarray(th.set_behaviour(probs, kappa, valid))
        # Away from the boundary (|π − κ| ≫ ε) the softmask equals S, empty sets included.
        far = np.all(np.abs(np.asarray(probs) - kappa) > 0.01, axis=-1)
        np.testing.assert_allclose(s[far], hard[far], atol=1e-4)
    # ε = 1e-3 in float32 stays finite at extreme margins.
    assert np.all(np.isfinite(th.log_softmask(jnp.array([[1.0, 0.0]]), 0.5, jnp.ones((1, 2), bool),
                                              eps=1e-3)))


def test_softmask_gradient_is_finite_and_zero_on_invalid():
    valid = jnp.array([False, True, True])

    def f(logits):
        probs = jax.nn.softmax(jnp.where(valid, logits, th.NEG_INF))
        return th.log_softmask(probs, 0.3, valid)[1]

    grad = jax.grad(f)(jnp.array([0.1, 0.2, 0.3]))
    assert np.all(np.isfinite(grad)) and grad[0] == 0.0


def test_route_is_eq6_for_two_models_and_monotone_in_kappa():
    p_esc = jnp.linspace(0.0, 1.0, 101)
    probs = jnp.stack([1 - p_esc, p_esc], -1)
    model = jnp.zeros(101, jnp.int32)
    for kappa in (0.0, 0.02, 0.5, 0.77, 1.0):
        np.testing.assert_array_equal(th.route(probs, kappa, model), p_esc >= kappa)
    # K = 3: the largest model whose probability clears κ; never below the current model.
    probs3 = random_probs(jax.random.PRNGKey(2), (300,), 3)
    model3 = jax.random.randint(jax.random.PRNGKey(3), (300,), 0, 3)
    prev = None
    for kappa in np.linspace(1.0, 0.0, 11):  # lowering κ never routes to a smaller model
        a = np.asarray(th.route(probs3, kappa, model3))
        assert np.all(a >= np.asarray(model3))
        for i in range(300):
            ok = [j for j in range(int(model3[i]) + 1, 3) if probs3[i, j] >= kappa]
            assert a[i] == (max(ok) if ok else int(model3[i]))
        if prev is not None:
            assert np.all(a >= prev)
        prev = a


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_host_rule_is_eq6_on_random_inputs(k):
    """`route_rule` in numpy (the serving and offline path) equals the checked jax `route`, and
    `escalation_score` is max_{a>k} π(a|o) by a plain loop."""
    rng = np.random.default_rng(k)
    probs = np.asarray(random_probs(jax.random.PRNGKey(k), (50, 7), k), np.float32)
    model = rng.integers(0, k, (50, 7)).astype(np.int32)
    for kappa in (0.0, 0.1, 0.35, 0.5, 0.9, 1.0):
        host = th.route_rule(np, probs, np.float32(kappa), model)
        assert host.dtype == np.int32
        np.testing.assert_array_equal(host, np.asarray(th.route(jnp.asarray(probs),
                                                                jnp.float32(kappa), model)))
    score = th.escalation_score(np, probs, model)
    for i, j in itertools.product(range(50), range(7)):
        above = [probs[i, j, a] for a in range(model[i, j] + 1, k)]
        assert score[i, j] == (max(above) if above else 0.0)


def test_escalation_in_set():
    probs = jnp.array([[0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    model = jnp.zeros(3, jnp.int32)
    np.testing.assert_array_equal(th.escalation_in_set(probs, 0.4, model), [0, 1, 1])
    np.testing.assert_array_equal(th.escalation_in_set(probs, 0.9, model), [0, 1, 0])
    np.testing.assert_array_equal(th.escalation_in_set(probs, 0.3, jnp.ones(3, jnp.int32)), [0, 0, 0])


def test_clipped_weights_and_coverage_identities():
    rng = np.random.default_rng(0)
    b, t = 40, 7
    mask = np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]
    lt, lb = np.log(rng.uniform(0.01, 1, (b, t))), np.log(rng.uniform(0.01, 1, (b, t)))
    log_w = th.log_clipped_weights(lt, lb, mask, rho_bar=2.0)
    expect = [np.prod(np.minimum(2.0, np.exp(lt[i] - lb[i]))[mask[i]]) for i in range(b)]
    np.testing.assert_allclose(np.exp(log_w), expect, rtol=1e-5)
    correct, large_wrong = rng.random(b) < 0.6, rng.random(b) < 0.3
    exact = th.coverage_estimate(log_w, correct, large_wrong, "exact")
    union = th.coverage_estimate(log_w, correct, large_wrong, "union_bound")
    assert exact <= union + 1e-6
    # Target = behaviour ⇒ W ≡ 1 ⇒ the estimate is the empirical coverage.
    w1 = th.log_clipped_weights(lb, lb, mask)
    np.testing.assert_allclose(th.coverage_estimate(w1, correct, large_wrong, "exact"),
                               np.mean(correct | large_wrong), rtol=1e-6)
    with pytest.raises(ValueError, match="coverage estimator"):
        th.coverage_estimate(w1, correct, large_wrong, "nope")


def test_is_estimate_unbiased_on_toy_mdp():
    """E_π[W·1{R=1}] = P_S(R=1) when the clip is inactive, by exhaustive enumeration."""
    t, k = 3, 2
    key = jax.random.PRNGKey(4)
    pi = np.asarray(random_probs(key, (t,), k))  # behaviour per step (state = step index)
    s = np.asarray(th.set_behaviour(jnp.asarray(pi), 0.3, jnp.ones((t, k), bool)))
    reward = {seq: float(sum(seq) % 2 == 0) for seq in itertools.product(range(k), repeat=t)}
    est = 0.0
    truth = 0.0
    for seq, r in reward.items():
        p_pi = np.prod([pi[i, a] for i, a in enumerate(seq)])
        p_s = np.prod([s[i, a] for i, a in enumerate(seq)])
        lt = np.log(np.maximum([s[i, a] for i, a in enumerate(seq)], 1e-30))
        lb = np.log([pi[i, a] for i, a in enumerate(seq)])
        w = np.exp(th.log_clipped_weights(lt[None], lb[None], np.ones((1, t), bool), rho_bar=1e9))
        est += p_pi * float(w[0]) * r
        truth += p_s * r
    np.testing.assert_allclose(est, truth, rtol=1e-5)
