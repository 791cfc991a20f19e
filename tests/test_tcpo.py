"""The full TCPO iteration: jit, finiteness, padding invariance, κ direction, and learnability."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute import networks, tcpo
from jaxroute.core import threshold
from jaxroute.synthetic import synthetic_rollout
from jaxroute.types import Rollout


def random_rollout(seed, b=5, t=8, d=4, k=2):
    return synthetic_rollout(seed, b, t, d, k)


@pytest.fixture(scope="module")
def setup():
    nets = networks.make_networks(2, 4, hidden=(16, 16))
    cfg = tcpo.TCPOConfig()
    state = tcpo.init_state(nets, cfg, jax.random.PRNGKey(0))
    return nets, cfg, state, tcpo.make_update(nets, cfg)


def test_update_is_finite_and_respects_trust_region(setup):
    nets, cfg, state, update = setup
    for seed in range(4):
        batch = random_rollout(seed)
        new, m = update(state, batch, jax.random.PRNGKey(seed))
        chex.assert_trees_all_equal_shapes(new.policy_params, state.policy_params)
        chex.assert_tree_all_finite((new.policy_params, new.critic_params, m))
        assert int(new.step) == int(state.step) + 1
        assert not bool(m["nonfinite"])
        if bool(m["cpo_accepted"]):
            assert float(m["cpo_kl"]) <= cfg.max_kl * (1 + 1e-5)
            assert int(m["cpo_case"]) in (0, 1, 2, 3, 4)
        state = new


def pad_time(batch: Rollout, extra: int, garbage: float) -> Rollout:
    def pad(x, fill):
        widths = [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=fill)

    return batch._replace(
        obs=pad(batch.obs, garbage), model=pad(batch.model, 0), action=pad(batch.action, 1),
        log_behaviour=pad(batch.log_behaviour, -jnp.inf), cost=pad(batch.cost, garbage),
        verifier_ok=pad(batch.verifier_ok, False), mask=pad(batch.mask, False))


def test_padding_never_changes_the_update(setup):
    """Extra padded slots full of garbage change nothing.

    CG is run to convergence here: a truncated CG on the ill-conditioned softmask Fisher follows a
    Krylov path that float32 reduction order (which depends on T) can perturb by a few percent.
    """
    nets, cfg, state, _ = setup
    cfg = dataclasses.replace(cfg, cg_iters=60)
    update = tcpo.make_update(nets, cfg)
    batch = random_rollout(7)
    a, ma = update(state, batch, jax.random.PRNGKey(0))
    b, mb = update(state, pad_time(batch, 5, 1e6), jax.random.PRNGKey(0))
    chex.assert_trees_all_close(a.policy_params, b.policy_params, atol=1e-5)
    chex.assert_trees_all_close(a.critic_params, b.critic_params, atol=1e-5)
    np.testing.assert_allclose(a.kappa, b.kappa)
    assert bool(ma["cpo_accepted"]) == bool(mb["cpo_accepted"])


def test_kappa_moves_toward_more_escalation_after_misses(setup):
    nets, cfg, state, update = setup
    batch = random_rollout(3)
    # Every problem missed: small wrong, large right, verifier rejects every step.
    missed = batch._replace(correct=jnp.zeros(5, bool), large_wrong=jnp.zeros(5, bool),
                            verifier_ok=jnp.zeros_like(batch.verifier_ok))
    state_hi = state.replace(kappa=jnp.float32(0.9))  # Γ never escalates at κ = 0.9
    new, m = update(state_hi, missed, jax.random.PRNGKey(0))
    assert float(m["miscoverage"]) == 1.0
    np.testing.assert_allclose(new.kappa, 0.9 - 0.1 * (1.0 - cfg.alpha), rtol=1e-6)
    covered = batch._replace(large_wrong=jnp.ones(5, bool))
    new, m = update(state_hi, covered, jax.random.PRNGKey(0))
    assert float(m["miscoverage"]) == 0.0 and float(new.kappa) > 0.9


def test_kappa_step_is_eq5_in_closed_form(setup):
    nets, cfg, state, _ = setup
    batch = random_rollout(5)
    kappa, err, eta = tcpo.kappa_step(nets, cfg, state, batch, cfg.alpha)
    covered = tcpo.coverage_event(nets, cfg, state, batch)
    rows = np.asarray(batch.mask).any(-1)
    want_err = float(np.sum(rows & ~np.asarray(covered)) / rows.sum())
    want_eta = cfg.eta0 * (int(state.step) + 1) ** -(0.5 + cfg.xi)
    assert float(err) == pytest.approx(want_err)
    assert float(eta) == pytest.approx(want_eta, rel=1e-6)
    assert float(kappa) == pytest.approx(float(state.kappa) - want_eta * (want_err - cfg.alpha),
                                         rel=1e-6)


def test_surrogates_at_the_current_policy(setup):
    """At θ_k the ratios are 1: the objective is the mean summed advantage, the KL is 0 and flat,
    and the IS miscoverage is one minus the clipped-IS coverage of the batch."""
    nets, cfg, state, _ = setup
    batch = random_rollout(11)
    flat_k, unravel = tcpo.fisher.flatten(state.policy_params)

    def logits_of(flat):
        return nets.logits(unravel(flat), state.normalizer, batch.obs, batch.model)

    valid = threshold.valid_actions(batch.model, 2)
    log_q = tcpo.target_log_probs(cfg, state.kappa)
    log_q_k = log_q(logits_of(flat_k), valid)
    adv = tcpo.advantages(nets, cfg, state, batch, jnp.ones(batch.mask.shape))
    sur = tcpo.surrogates(logits_of, log_q, cfg, batch, log_q_k, adv)
    m = np.asarray(batch.mask, np.float32)
    rows = max(m.any(-1).sum(), 1)
    assert float(sur.objective(flat_k)) == pytest.approx(
        float(np.sum(m * np.asarray(adv.adv_cost)) / rows), rel=1e-5, abs=1e-6)
    assert float(sur.mean_kl(flat_k)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(jax.grad(sur.mean_kl)(flat_k), 0.0, atol=1e-5)
    assert 0.0 <= float(sur.miscoverage_is(flat_k)) <= 1.0 + 1e-6


def test_critic_step_lowers_the_critic_loss(setup):
    nets, cfg, state, _ = setup
    batch = random_rollout(2)
    adv = tcpo.advantages(nets, cfg, state, batch, jnp.ones(batch.mask.shape))
    targets = jnp.stack([adv.cost.vs, adv.correct.vs])
    m = np.asarray(batch.mask, np.float32)

    def loss(params):
        v = tcpo.critic_values(nets, params, state.normalizer, batch)
        return np.sum(m[None] * (np.asarray(v) - np.asarray(targets)) ** 2, axis=(1, 2)) / m.sum()

    critics, _, losses = tcpo.critic_step(nets, dataclasses.replace(cfg, critic_steps=50), state,
                                          batch, adv)
    assert np.all(loss(critics) < loss(state.critic_params))
    np.testing.assert_allclose(losses, loss(critics), rtol=0.5)  # the last step's own loss


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        tcpo.TCPOConfig(alpha=1.5)
    with pytest.raises(ValueError, match="coverage_event"):
        tcpo.TCPOConfig(coverage_event="magic")
    with pytest.raises(ValueError, match="max_kl"):
        tcpo.TCPOConfig(max_kl=0.0)


# --- learnability: a one-decision routing problem with an informative confidence feature -------

SMALL_COST, LARGE_COST = 0.1, 1.0


def bandit_rollout(state, nets, key, b):
    """One decision per problem. The small model is right iff x > −0.5 (70% of problems)."""
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (b, 1, 1))
    model = jnp.zeros((b, 1), jnp.int32)
    logp = nets.log_probs(state.policy_params, state.normalizer, x, model)
    action = jax.random.categorical(ka, logp).astype(jnp.int32)
    small_right = x[:, 0, 0] > -0.5
    return Rollout(
        obs=x, model=model, action=action,
        log_behaviour=jnp.take_along_axis(logp, action[..., None], -1)[..., 0],
        cost=jnp.where(action == 1, SMALL_COST + LARGE_COST, SMALL_COST),
        verifier_ok=small_right[:, None], mask=jnp.ones((b, 1), bool),
        correct=(action[:, 0] == 1) | small_right, large_wrong=jnp.zeros(b, bool))


@pytest.mark.benchmark  # slow; `tests/test_trainer.py` checks TCPO learns on trace trees
def test_learns_to_escalate_only_when_needed():
    nets = networks.make_networks(2, 1, hidden=(32, 32))
    cfg = dataclasses.replace(tcpo.TCPOConfig(), alpha=0.05, softmask_eps=0.05)
    update = tcpo.make_update(nets, cfg)
    state = tcpo.init_state(nets, cfg, jax.random.PRNGKey(0))

    @jax.jit
    def train(state, key):
        def body(state, key):
            k1, k2 = jax.random.split(key)
            state, m = update(state, bandit_rollout(state, nets, k1, 64), k2)
            return state, m["miscoverage"]
        return jax.lax.scan(body, state, jax.random.split(key, 400))

    state, _ = train(state, jax.random.PRNGKey(1))
    x = jnp.linspace(-3, 3, 601)[:, None]
    probs = jnp.exp(nets.log_probs(state.policy_params, state.normalizer, x,
                                   jnp.zeros(601, jnp.int32)))
    esc = np.asarray(threshold.route(probs, state.kappa, jnp.zeros(601, jnp.int32)) == 1)
    xs = np.asarray(x[:, 0])
    # Γ escalates on (almost) all of the region where the small model fails ...
    assert esc[xs < -0.6].mean() > 0.9
    # ... and keeps most of the region where it succeeds on the cheap model.
    assert esc[xs > 0.5].mean() < 0.2
