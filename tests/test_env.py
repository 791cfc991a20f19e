"""The offline environment equals a plain-Python replay of the JSON trees; rollouts are consistent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute import env, synthetic, trace


def rule(features, model, k):
    """A deterministic per-node rule both implementations evaluate independently."""
    conf, step = features[0], features[1]
    if conf < -1.0:
        return k - 1
    if conf < 0.0 and int(step) % 2 == 0:
        return min(model + 1, k - 1)
    return model


def python_replay(p, root, manifest, k):
    """Walk one problem's JSON tree by hand: (correct, total cost in 1e12 FLOPs, escalated)."""
    seg = p["roots"][root]
    t = 0
    cost = seg["steps"][0]["cost"]["flops"] / 1e12
    escalated = False
    while True:
        step = seg["steps"][t]
        a = rule(step["features"], seg["model"], k)
        if a == seg["model"]:
            if t + 1 == len(seg["steps"]):
                return seg["correct"], cost, escalated
            t += 1
            cost += seg["steps"][t]["cost"]["flops"] / 1e12
            continue
        escalated = True
        br = step["branches"][str(a)]
        if a == k - 1:
            return br["correct"], cost + br["cost"]["flops"] / 1e12, escalated
        seg, t = br, 0
        cost += seg["steps"][0]["cost"]["flops"] / 1e12


@pytest.mark.parametrize("k", [2, 3])
def test_walk_equals_python_replay(k):
    cfg = (synthetic.three_model_config(num_problems=30, roots_per_problem=2) if k == 3
           else synthetic.SyntheticConfig(num_problems=60, roots_per_problem=2))
    manifest, problems = synthetic.generate(cfg)
    packed = trace.pack(manifest, problems)
    problems_idx, roots = env.instances(packed, np.arange(len(problems)))
    acts = np.zeros(packed.step_cost.shape, np.int32)
    for idx in np.ndindex(*packed.step_cost.shape):
        acts[idx] = rule(packed.features[idx], packed.seg_model[idx[:2]], k)
    w = env.walk(env.to_device(packed), jnp.asarray(problems_idx), jnp.asarray(roots),
                 jnp.asarray(acts[problems_idx]), env.horizon(packed))
    for n, (pi, r) in enumerate(zip(problems_idx, roots, strict=True)):
        correct, cost, escalated = python_replay(problems[pi], r, manifest, k)
        assert bool(w.correct[n]) == correct
        np.testing.assert_allclose(float(w.total_cost[n]), cost, rtol=1e-4)
        assert (int(w.escalation[n]) >= 0) == escalated
        # Decision slots form a prefix and the costs add up.
        m = np.asarray(w.mask[n])
        assert np.all(m[: m.sum()]) and not np.any(m[m.sum():])
    # Both kinds of outcome occur, so the comparison is not vacuous.
    assert 0 < float(w.correct.mean()) < 1 and 0 < float((w.escalation >= 0).mean()) < 1


def test_rollout_batch_is_consistent_with_the_walk():
    manifest, problems = synthetic.generate(synthetic.SyntheticConfig(num_problems=50))
    packed = trace.pack(manifest, problems)
    dev = env.to_device(packed)
    probs = jnp.arange(50, dtype=jnp.int32)
    roots = jnp.zeros(50, jnp.int32)

    def log_prob_fn(obs, model):  # escalate with probability σ(−confidence)
        p = jax.nn.sigmoid(-obs[..., 0])
        return jnp.log(jnp.stack([1 - p, p], -1))

    batch, w = env.rollout(dev, probs, roots, log_prob_fn, jax.random.PRNGKey(0),
                           env.horizon(packed))
    np.testing.assert_allclose(batch.cost.sum(-1), w.total_cost, rtol=1e-6)
    m = np.asarray(batch.mask)
    np.testing.assert_array_equal(np.asarray(batch.obs)[m], np.asarray(
        packed.features[np.asarray(probs)[:, None], np.asarray(w.seg), np.asarray(w.step)])[m])
    expect = np.asarray(log_prob_fn(batch.obs, batch.model))
    expect = np.take_along_axis(expect, np.asarray(batch.action)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(batch.log_behaviour)[m], expect[m], rtol=1e-5)
    np.testing.assert_array_equal(batch.large_wrong, ~packed.solo_correct[:50, -1])
    # An episode ends at its first escalation (K = 2: escalation goes to a leaf).
    esc = np.asarray(batch.action > batch.model) & m
    assert np.all(esc.sum(-1) <= 1)
    assert np.all(~esc | ~np.roll(m, -1, axis=1) | (np.arange(m.shape[1]) == m.shape[1] - 1))


def test_policy_over_many_trees_is_evaluated_in_chunks_with_the_same_result(monkeypatch):
    """Regression (decision 81): 100 000 problems' nodes went through the MLP at once."""
    manifest, packed = synthetic.generate_packed(synthetic.SyntheticConfig(num_problems=23))
    sub = env.gather(env.to_device(packed), jnp.arange(23))
    w = jax.random.normal(jax.random.PRNGKey(0), (len(manifest.feature_names), 2))

    def log_prob_fn(obs, model):  # any per-node function of features and model
        return jax.nn.log_softmax(jnp.tanh(obs @ w) + model[..., None], -1)

    whole = env.node_log_probs(log_prob_fn, sub)
    monkeypatch.setattr(env, "NODE_CHUNK", 5)  # 23 trees: four full chunks and a remainder
    chunked = env.node_log_probs(log_prob_fn, sub)
    assert chunked.shape == whole.shape == sub.step_cost.shape + (2,)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
