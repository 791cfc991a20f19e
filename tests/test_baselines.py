"""Baselines: the mixture fit recovers a known mixture; the oracle equals exhaustive enumeration."""

import itertools

import jax.numpy as jnp
import numpy as np

from jaxroute import baselines, env, evaluate, stats, synthetic, trace


def test_mixture_recovers_known_mixture():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2.0, 0.5, 3000), rng.normal(1.5, 1.0, 7000)])
    mix = baselines.fit_mixture(rng.permutation(x))
    np.testing.assert_allclose(mix.means[0], [-2.0, 1.5], atol=0.05)
    np.testing.assert_allclose(mix.stds[0], [0.5, 1.0], atol=0.05)
    np.testing.assert_allclose(mix.weights[0], [0.3, 0.7], atol=0.02)
    post = baselines.posterior_high(mix, np.array([-3.0, 0.0, 3.0]), np.zeros(3, int))
    assert post[0] < 0.01 and post[2] > 0.99 and 0 < post[1] < 1


def enumerate_paths(packed, i, root):
    """All (correct, cost) outcomes for K = 2 by walking every 'escalate at step t' policy."""
    n = int(packed.seg_len[i, root])
    dev = env.to_device(packed)
    outs = []
    for t_esc in list(range(n)) + [None]:
        acts = np.zeros(packed.step_cost.shape[1:], np.int32)
        if t_esc is not None:
            acts[root, t_esc] = 1
        w = env.walk(dev, jnp.array([i]), jnp.array([root]), jnp.asarray(acts[None]),
                     env.horizon(packed))
        outs.append((bool(w.correct[0]), float(w.total_cost[0])))
    return outs


def test_oracle_equals_enumeration_on_random_trees():
    manifest, problems = synthetic.generate(
        synthetic.SyntheticConfig(num_problems=40, roots_per_problem=2, seed=3))
    packed = trace.pack(manifest, problems)
    oc = baselines.oracle_costs(packed)
    for i, r in itertools.product(range(40), range(2)):
        outs = enumerate_paths(packed, i, r)
        cheapest = min(c for _, c in outs)
        correct = [c for ok, c in outs if ok]
        np.testing.assert_allclose(oc.cheapest[i, r], cheapest, rtol=1e-5)
        if correct:
            np.testing.assert_allclose(oc.cheapest_correct[i, r], min(correct), rtol=1e-5)
        else:
            assert np.isinf(oc.cheapest_correct[i, r])


def hand_tree():
    """Two problems by hand. Costs in FLOPs (1e12 after packing)."""
    def cost(x):
        return {"flops": x * 1e12, "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}

    def step(conf, leaf_ok, leaf_cost, c=1.0):
        return {"features": [conf], "cost": cost(c), "verifier_ok": True,
                "branches": {"1": {"model": 1, "correct": leaf_ok, "cost": cost(leaf_cost)}}}

    p0 = {"problem_id": "a", "dataset": "hand", "difficulty": None, "split": "test",
          "solo": [{"correct": False, "cost": cost(3)}, {"correct": True, "cost": cost(10)}],
          # small wrong; escalating after step 1 (steps 1 + 1, branch 4) is the cheapest correct
          # path: the branch regenerates step 1, which was already paid for
          "roots": [{"model": 0, "correct": False,
                     "steps": [step(0.0, True, 9), step(-2.0, True, 4), step(0.0, False, 2)]}]}
    p1 = {"problem_id": "b", "dataset": "hand", "difficulty": None, "split": "test",
          "solo": [{"correct": True, "cost": cost(2)}, {"correct": True, "cost": cost(10)}],
          "roots": [{"model": 0, "correct": True,
                     "steps": [step(0.0, True, 9), step(0.0, True, 8)]}]}
    manifest = trace.Manifest(models=(trace.ModelInfo("s", 1), trace.ModelInfo("l", 2)),
                              feature_names=("confidence",))
    return manifest, [p0, p1]


def test_oracle_on_hand_built_trees():
    manifest, problems = hand_tree()
    packed = trace.pack(manifest, problems)
    oc = baselines.oracle_costs(packed)
    np.testing.assert_allclose(oc.cheapest_correct[:, 0], [6.0, 2.0])
    np.testing.assert_allclose(oc.cheapest[:, 0], [3.0, 2.0])
    assert list(oc.cheapest_is_correct[:, 0]) == [False, True]
    res = evaluate.oracle_summary(packed, np.array([0, 1]), np.array([0, 0]), alpha=0.0)
    assert res["hindsight oracle (max accuracy, knows the samples)"]["accuracy"] == 100.0
    assert res["hindsight oracle (max accuracy, knows the samples)"]["cost"] == 4.0
    # With α = 0.5 one miss is allowed: leave problem a on its cheapest (wrong) path.
    res = evaluate.oracle_summary(packed, np.array([0, 1]), np.array([0, 0]), alpha=0.5)
    assert res["hindsight oracle (coverage 1-α, knows the samples)"]["cost"] == 2.5
    assert res["hindsight oracle (coverage 1-α, knows the samples)"]["coverage"] == 0.5


def test_threshold_and_steer_actions_escalate_on_low_confidence():
    manifest, problems = hand_tree()
    packed = trace.pack(manifest, problems)
    acts = baselines.confidence_threshold(packed, 0, -1.0)
    assert acts[0, 0, 1] == 1 and acts[0, 0, 0] == 0 and acts[1].max() == 0
    w = env.walk(env.to_device(packed), jnp.array([0, 1]), jnp.array([0, 0]), jnp.asarray(acts),
                 env.horizon(packed))
    np.testing.assert_allclose(w.total_cost, [6.0, 2.0])
    assert list(np.asarray(w.correct)) == [True, True]


def test_cost_at_accuracy_uses_the_lower_hull():
    curve = [{"accuracy": 50.0, "cost": 1.0}, {"accuracy": 70.0, "cost": 5.0},
             {"accuracy": 90.0, "cost": 3.0}, {"accuracy": 95.0, "cost": 9.0}]
    # (70, 5) is dominated by mixing (50, 1) and (90, 3).
    assert stats.cost_at_accuracy(curve, 70.0) == 2.0
    assert stats.cost_at_accuracy(curve, 92.5) == 6.0
    assert np.isnan(stats.cost_at_accuracy(curve, 99.0))
    assert stats.cost_at_accuracy(curve, 10.0) == 1.0


def test_matched_costs_read_every_curve_at_the_reference_accuracy():
    rows = [{"method": "router (ours)", "accuracy": 70.0, "cost": 3.0}]
    curves = {"router (ours)": [{"accuracy": 70.0, "cost": 3.0}],
              "a": [{"accuracy": 60.0, "cost": 1.0}, {"accuracy": 80.0, "cost": 5.0}],
              "b": [{"accuracy": 50.0, "cost": 1.0}]}
    m = stats.matched_costs(rows, curves)
    assert m["accuracy"] == 70.0 and set(m["costs"]) == {"a", "b"}
    assert m["costs"]["a"] == 3.0 and np.isnan(m["costs"]["b"])
    assert stats.matched_costs([], curves) == {}
