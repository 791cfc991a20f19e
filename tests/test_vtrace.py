"""V-trace against a plain loop, the Monte-Carlo return, rlax, and padding invariance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from jaxroute.core import vtrace as vt


def random_batch(seed, b=6, t=9, max_rho=3.0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]
    values = rng.normal(size=(b, t)).astype(np.float32)
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    rho = rng.uniform(0.0, max_rho, (b, t)).astype(np.float32)
    disc = np.asarray(vt.episodic_discounts(jnp.asarray(mask), 0.9))
    return values, rewards, rho, disc, mask, lengths


def loop_vtrace(values, boot, rewards, disc, rho, length, rho_bar, c_bar, pg_bar, lam):
    """Textbook IMPALA recursion on one trajectory's valid prefix, in float64."""
    v = np.asarray(values[:length], np.float64)
    vn = np.append(v[1:], boot)
    vs = np.zeros(length)
    acc = 0.0
    for s in reversed(range(length)):
        delta = min(rho_bar, rho[s]) * (rewards[s] + disc[s] * vn[s] - v[s])
        acc = delta + (disc[s] * lam * min(c_bar, rho[s]) * acc if s + 1 < length else 0.0)
        vs[s] = v[s] + acc
    vs_next = np.append(vs[1:], boot)
    q = lam * vs_next + (1 - lam) * vn
    adv = np.minimum(pg_bar, rho[:length]) * (rewards[:length] + disc[:length] * q - v)
    return vs, adv


@pytest.mark.parametrize("rho_bar,c_bar,lam", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.9), (1.5, 0.7, 0.5)])
def test_matches_plain_loop(rho_bar, c_bar, lam):
    values, rewards, rho, disc, mask, lengths = random_batch(0)
    out = jax.jit(lambda *a: vt.vtrace_targets(*a, rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=rho_bar,
                                        lambda_=lam))(
        values, np.zeros(len(lengths), np.float32), rewards, disc, rho, mask)
    for i, n in enumerate(lengths):
        vs, adv = loop_vtrace(values[i], 0.0, rewards[i], disc[i], rho[i], n,
                              rho_bar, c_bar, rho_bar, lam)
        np.testing.assert_allclose(out.vs[i, :n], vs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.pg_advantage[i, :n], adv, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(out.vs[i, n:]) == 0)


def test_on_policy_equals_monte_carlo_return():
    values, rewards, _, _, mask, lengths = random_batch(1)
    disc = np.asarray(vt.episodic_discounts(jnp.asarray(mask), 1.0))
    ones = np.ones_like(values)
    out = vt.vtrace_targets(values, np.zeros(len(lengths), np.float32), rewards, disc, ones, mask)
    for i, n in enumerate(lengths):
        ret = np.cumsum(rewards[i, :n][::-1])[::-1]  # undiscounted reward-to-go
        np.testing.assert_allclose(out.vs[i, :n], ret, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.pg_advantage[i, :n], ret - values[i, :n], atol=1e-5)


@pytest.mark.parametrize("rho_bar", [1.0, 2.0])
@pytest.mark.parametrize("lam", [1.0, 0.8])
def test_matches_rlax(rho_bar, lam):
    """rlax (c̄ = 1 fixed) vmapped over the batch, with sample_mask, on whole padded rows."""
    values, rewards, rho, disc, mask, lengths = random_batch(2)
    boot = np.zeros(len(lengths), np.float32)
    ours = vt.vtrace_targets(values, boot, rewards * mask, disc, rho, mask, rho_bar=rho_bar, c_bar=1.0,
                     pg_rho_bar=rho_bar, lambda_=lam)

    def one(v, r, d, p, mk):
        v_t = jnp.concatenate([v[1:], jnp.zeros(1)])
        return rlax.vtrace_td_error_and_advantage(
            v, v_t, r, d, p, lambda_=lam, clip_rho_threshold=rho_bar,
            clip_pg_rho_threshold=rho_bar, sample_mask=mk)

    ref = jax.vmap(one)(values * mask, rewards * mask, disc, np.where(mask, rho, 1.0), mask)
    np.testing.assert_allclose(ours.vs, (ref.errors + values * mask) * mask, atol=1e-5)
    np.testing.assert_allclose(ours.pg_advantage, ref.pg_advantage * mask, atol=1e-5)


def test_padding_invariance_and_no_nan():
    values, rewards, rho, disc, mask, lengths = random_batch(3)
    boot = np.zeros(len(lengths), np.float32)
    clean = vt.vtrace_targets(values, boot, rewards, disc, rho, mask, rho_bar=2.0)
    junk = lambda x, fill: np.where(mask, x, fill).astype(np.float32)  # noqa: E731
    dirty = vt.vtrace_targets(junk(values, np.nan), boot, junk(rewards, np.inf), junk(disc, 7.0),
                      junk(rho, np.inf), mask, rho_bar=2.0)
    for a, b in zip(clean, dirty, strict=True):
        chex.assert_tree_all_finite(b)
        np.testing.assert_array_equal(a, b)
    # Extending T with more padding leaves the valid outputs unchanged.
    pad = lambda x, fill=0.0: np.pad(x, ((0, 0), (0, 4)), constant_values=fill)  # noqa: E731
    longer = vt.vtrace_targets(pad(values), boot, pad(rewards), pad(disc), pad(rho, 1.0),
                       pad(mask, False), rho_bar=2.0)
    np.testing.assert_allclose(longer.vs[:, :values.shape[1]], clean.vs, atol=1e-6)


def test_trace_cutting():
    """If ρ = 0 after step s, then v_s is the one-step target from s."""
    rng = np.random.default_rng(4)
    t = 6
    values, rewards = rng.normal(size=(1, t)), rng.normal(size=(1, t))
    rho = np.array([[1.7, 0.4, 0.0, 0.0, 0.0, 0.0]])
    mask = np.ones((1, t), bool)
    disc = np.asarray(vt.episodic_discounts(jnp.asarray(mask)))
    out = vt.vtrace_targets(values.astype(np.float32), np.zeros(1, np.float32), rewards.astype(np.float32),
                    disc, rho.astype(np.float32), mask, rho_bar=2.0)
    expect = values[0, 1] + 0.4 * (rewards[0, 1] + values[0, 2] - values[0, 1])
    np.testing.assert_allclose(out.vs[0, 1], expect, rtol=1e-5)


def test_targets_are_stop_gradient():
    values, rewards, rho, disc, mask, lengths = random_batch(5)
    boot = np.zeros(len(lengths), np.float32)

    def loss(v):
        out = vt.vtrace_targets(v, boot, rewards, disc, rho, mask)
        return jnp.sum(out.vs) + jnp.sum(out.pg_advantage)

    np.testing.assert_array_equal(jax.grad(loss)(jnp.asarray(values)), 0.0)


def test_discount_and_terminal_helpers():
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(vt.episodic_discounts(mask, 0.5),
                                  [[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(vt.terminal_indicator(mask),
                                  [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
