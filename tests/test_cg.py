"""CG against a dense solve; the FVP is the damped Fisher (symmetric PSD, matches KL curvature)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute import networks
from jaxroute.core import cg, fisher, threshold


@pytest.fixture(scope="module")
def policy_kl():
    """Mean KL(S̃_k ‖ S̃_θ) of a small router policy on random observations (float64-free)."""
    nets = networks.make_networks(2, 3, hidden=(8, 8))
    params, _, _ = networks.init_params(nets, jax.random.PRNGKey(0))
    # Perturb the output layer so the policy is far from uniform and the Fisher is informative.
    params = jax.tree.map(lambda x: x * 1.0, params)
    flat, unravel = fisher.flatten(params)
    flat = flat + 0.3 * jax.random.normal(jax.random.PRNGKey(1), flat.shape)
    obs = jax.random.normal(jax.random.PRNGKey(2), (64, 3))
    model = jnp.zeros(64, jnp.int32)
    norm = networks.Normalizer.identity(3)
    valid = threshold.valid_actions(model, 2)

    def log_s(f, eps):
        probs = jnp.exp(nets.log_probs(unravel(f), norm, obs, model))
        return threshold.log_softmask(probs, 0.5, valid, eps)

    def make_kl(eps):
        ref = jax.lax.stop_gradient(log_s(flat, eps))
        return lambda f: jnp.mean(fisher.categorical_kl(ref, log_s(f, eps)))

    return flat, make_kl


def dense(matvec, n):
    return jax.vmap(matvec)(jnp.eye(n)).T


def test_cg_equals_dense_solve_on_spd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 30))
    a = a @ a.T + 0.5 * np.eye(30)
    b = rng.normal(size=30)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    res = jax.jit(lambda b: cg.conjugate_gradient(lambda v: a32 @ v, b, iters=200, tol=1e-7))(b32)
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=2e-3, atol=2e-3)
    assert not res.breakdown and res.iterations < 200


def test_cg_on_damped_fisher_equals_dense_solve(policy_kl):
    flat, make_kl = policy_kl
    fvp = fisher.make_fvp(make_kl(0.05), flat, damping=0.1)
    n = flat.shape[0]
    f_dense = np.asarray(dense(fvp, n), np.float64)
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (n,)))
    res = cg.conjugate_gradient(fvp, jnp.asarray(g), iters=n, tol=1e-8)
    expect = np.linalg.solve(f_dense, g)
    np.testing.assert_allclose(res.x, expect, rtol=1e-2, atol=1e-3 * np.abs(expect).max())
    # Ten iterations (the trainer's default) already make real progress.
    ten = cg.conjugate_gradient(fvp, jnp.asarray(g), iters=10)
    assert np.linalg.norm(ten.x - expect) < 0.6 * np.linalg.norm(expect)


def test_cg_matches_jax_scipy(policy_kl):
    flat, make_kl = policy_kl
    fvp = fisher.make_fvp(make_kl(0.05), flat, damping=0.1)
    g = jax.random.normal(jax.random.PRNGKey(4), flat.shape)
    ours = cg.conjugate_gradient(fvp, g, iters=25, tol=0.0)
    ref, _ = jax.scipy.sparse.linalg.cg(fvp, g, maxiter=25, tol=0.0)
    np.testing.assert_allclose(ours.x, ref, rtol=1e-3, atol=1e-4)


def test_fvp_symmetric_psd(policy_kl):
    flat, make_kl = policy_kl
    n = flat.shape[0]
    f0 = np.asarray(dense(fisher.make_fvp(make_kl(0.01), flat, damping=0.0), n), np.float64)
    np.testing.assert_allclose(f0, f0.T, atol=1e-4 * np.abs(f0).max())
    eig = np.linalg.eigvalsh(0.5 * (f0 + f0.T))
    assert eig.min() > -1e-4 * eig.max()
    f1 = np.asarray(dense(fisher.make_fvp(make_kl(0.01), flat, damping=0.3), n), np.float64)
    np.testing.assert_allclose(f1 - f0, 0.3 * np.eye(n), atol=1e-4 * np.abs(f0).max())


def test_quadratic_model_of_kl(policy_kl):
    """½ vᵀFv matches the actual KL to second order along a shrinking direction."""
    flat, make_kl = policy_kl
    kl = make_kl(0.2)
    fvp = fisher.make_fvp(kl, flat, damping=0.0)
    d = jax.random.normal(jax.random.PRNGKey(5), flat.shape)
    d = d / jnp.linalg.norm(d)
    ratios = []
    for scale in (1e-1, 3e-2):  # smaller steps drown the KL in float32 round-off
        v = scale * d
        ratios.append(float(kl(flat + v) / (0.5 * jnp.vdot(v, fvp(v)))))
    np.testing.assert_allclose(ratios, 1.0, atol=0.05)


def test_cg_breakdown_guard():
    """A singular (zero) operator stops CG without NaN."""
    res = cg.conjugate_gradient(lambda v: jnp.zeros_like(v), jnp.ones(5), iters=10)
    assert res.breakdown and np.all(np.isfinite(res.x)) and res.iterations == 0
    # Indefinite operator: the guard fires at the first direction of negative curvature.
    a = jnp.diag(jnp.array([1.0, -1.0]))
    res = cg.conjugate_gradient(lambda v: a @ v, jnp.array([0.0, 1.0]), iters=10)
    assert res.breakdown and np.all(np.isfinite(res.x))


@pytest.mark.parametrize("target", ["softmask", "policy"])
def test_the_learners_trust_region_fvp_equals_forward_over_reverse(target):
    """`categorical_kl_fvp` (both learners' Fisher: `make_ggn_fvp` on per-row logit Hessians)
    equals the jvp-of-grad Fisher (`make_fvp`) of the same weighted KL, with uneven weights and
    rows of weight 0, for the softmask and for π, K = 3."""
    nets = networks.make_networks(3, 3, hidden=(6,))
    params, _, _ = networks.init_params(nets, jax.random.PRNGKey(16))
    flat, unravel = fisher.flatten(params)
    flat = flat + 0.3 * jax.random.normal(jax.random.PRNGKey(17), flat.shape)
    obs = jax.random.normal(jax.random.PRNGKey(18), (6, 5, 3))
    model = jax.random.randint(jax.random.PRNGKey(19), (6, 5), 0, 3)
    norm = networks.Normalizer.identity(3)
    valid = threshold.valid_actions(model, 3)
    w = jax.random.uniform(jax.random.PRNGKey(20), (6, 5)) * (jnp.arange(5)[None] < 4)
    w = w / w.sum()

    def log_q(u, ok):
        log_p = threshold.masked_log_softmax(u, ok)
        return log_p if target == "policy" else threshold.log_softmask(jnp.exp(log_p), 0.3, ok,
                                                                        0.05)

    def logits(f):
        return nets.logits(unravel(f), norm, obs, model)

    u = logits(flat)
    ref = jax.lax.stop_gradient(log_q(u, valid))
    weighted_kl = lambda f: jnp.sum(w * fisher.categorical_kl(ref, log_q(logits(f), valid)))  # noqa
    a = dense(fisher.make_fvp(weighted_kl, flat, 0.1), flat.shape[0])
    b = dense(fisher.categorical_kl_fvp(logits, flat, u, ref, valid, w, log_q, damping=0.1),
              flat.shape[0])
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
