"""Exact tree expectations (against enumeration and deterministic walks) and the exact trainer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute import env, evaluate, exact, synthetic, trace, trainer


def _instances(trees):
    dev = env.to_device(trees)
    problems, roots = env.instances(trees, np.arange(trees.num_problems))
    return dev, problems, roots, env.gather(dev, jnp.asarray(problems))


@pytest.mark.parametrize("k", [2, 3])
def test_deterministic_policies_equal_the_tree_walk(k):
    cfg = (synthetic.SyntheticConfig(num_problems=60, roots_per_problem=2) if k == 2 else
           synthetic.three_model_config(num_problems=30, max_steps=4))
    m, probs = synthetic.generate(cfg)
    trees = trace.pack(m, probs)
    dev, problems, roots, sub = _instances(trees)
    rng = np.random.default_rng(k)
    for _ in range(3):
        acts = rng.integers(0, k, sub.step_cost.shape)
        model = np.broadcast_to(np.asarray(sub.seg_model)[..., None], acts.shape)
        acts = np.maximum(acts, model).astype(np.int32)  # valid actions only
        e = exact.expected_outcome(sub, jax.nn.one_hot(acts, k), jnp.asarray(roots))
        w = env.walk(dev, jnp.asarray(problems), jnp.asarray(roots), jnp.asarray(acts),
                     env.horizon(trees))
        np.testing.assert_allclose(e.cost, w.total_cost, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(e.correct), np.asarray(w.correct, float))


@pytest.mark.parametrize("k", [2, 3])
def test_stochastic_policy_equals_enumeration_over_every_action_assignment(k):
    """E under independent per-node actions = Σ over all assignments of Π q · walk outcome."""
    cfg = (synthetic.SyntheticConfig(num_problems=4, max_steps=4, mean_steps=(2,) * 5) if k == 2
           else synthetic.three_model_config(num_problems=3, max_steps=2,
                                             mean_steps=(1.0,) * 5))
    m, probs = synthetic.generate(cfg)
    trees = trace.pack(m, probs)
    dev, problems, roots, sub = _instances(trees)
    rng = np.random.default_rng(7)
    q = rng.dirichlet(np.ones(k), sub.step_cost.shape)
    model = np.broadcast_to(np.asarray(sub.seg_model)[..., None], sub.step_cost.shape)
    q = np.where(np.arange(k) >= model[..., None], q, 0.0)
    q = q / q.sum(-1, keepdims=True)
    e = exact.expected_outcome(sub, jnp.asarray(q, jnp.float32), jnp.asarray(roots))
    valid = np.arange(sub.step_cost.shape[2])[None, None] < np.asarray(sub.seg_len)[..., None]
    for n in range(len(problems)):
        nodes = list(zip(*np.nonzero(valid[n]), strict=True))
        choices = [range(int(model[n][s, t]), k) for s, t in nodes]
        cost = correct = 0.0
        for assign in itertools.product(*choices):
            acts = model[n].copy().astype(np.int32)
            p = 1.0
            for (s, t), a in zip(nodes, assign, strict=True):
                acts[s, t] = a
                p *= q[n, s, t, a]
            w = env.walk(dev, jnp.asarray(problems[n:n + 1]), jnp.asarray(roots[n:n + 1]),
                         jnp.asarray(acts[None]), env.horizon(trees))
            cost += p * float(w.total_cost[0])
            correct += p * float(w.correct[0])
        assert float(e.cost[n]) == pytest.approx(cost, rel=1e-4)
        assert float(e.correct[n]) == pytest.approx(correct, abs=1e-5)


@pytest.mark.slow
def test_exact_trainer_meets_the_train_constraint_and_beats_the_threshold_at_the_guarantee():
    """On an informative synthetic world the trained router reaches the train constraint, its
    seeds agree, and calibrated on cal it is cheaper than the calibrated confidence threshold
    with test coverage whose CI reaches 1 − α."""
    alpha = 0.1
    m, probs = synthetic.generate(synthetic.family_config(0.75, 0.9, seed=3, num_problems=600,
                                                          max_steps=10))
    trees = trace.pack(m, probs)
    res = trainer.train(trees, trainer.TrainConfig(exact.ExactConfig(alpha=alpha), seeds=(0, 1),
                                                   final_calibration=False))
    cost, miss = exact.train_objective(trees, res.networks, res.normalizer, res.params)
    assert np.all(miss <= alpha * 1.02) and np.all(cost < 0.9)
    out = evaluate.evaluate_all(trees, {"r0": res.log_prob_fn(0), "r1": res.log_prob_fn(1)},
                                alpha, m.feature_names, references=False)
    rows = {r["method"]: r for r in out["rows"]}
    for r in ("r0", "r1"):
        assert rows[r]["coverage_ci"][1] >= 1 - alpha
        assert rows[r]["cost"] < rows["confidence threshold"]["cost"]
    assert abs(rows["r0"]["cost"] - rows["r1"]["cost"]) < 0.1 * rows["r0"]["cost"]
