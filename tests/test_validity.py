"""The validity check of both guarantees (`jaxroute.validity`): re-splits calibrated by the one
rule, and the guarantees holding on a pool whose per-knob risk is known."""

import math

import numpy as np
import pytest

from jaxroute import baselines, env, guarantee, synthetic, trace, validity


def _pool(p, risk, rng):
    """Nested {0, 1} errors `[p, G]` with true miscoverage `risk[g]` at knob g, and a cost that
    falls as the knob gets cheaper."""
    u = rng.uniform(size=(p, 1))
    errors = (u < np.asarray(risk)).astype(float)
    cost = np.broadcast_to(np.linspace(10.0, 1.0, len(risk)), errors.shape) + rng.uniform(
        size=errors.shape)
    return errors, cost


def test_each_resplit_is_calibrated_by_the_one_rule_on_its_own_draw():
    rng = np.random.default_rng(0)
    errors, cost = _pool(600, np.linspace(0.0, 0.3, 7), rng)
    for delta in (None, 0.1):
        r = validity.resplit(errors, cost, 0.1, delta, 150, 12, seed=5)
        draw = np.random.default_rng(5)
        for i in range(12):
            order = draw.permutation(600)
            cal, test = order[:150], order[150:]
            idx, ok = guarantee.conformal_choice(errors[cal], 0.1, delta)
            assert (r["index"][i], r["feasible"][i]) == (idx, ok)
            assert r["miscoverage"][i] == pytest.approx(errors[test, idx].mean())
            assert r["cost"][i] == pytest.approx(cost[test, idx].mean())


def test_both_guarantees_hold_as_stated_on_a_pool_of_known_risk():
    """Marginal: mean risk ≤ α; PAC: P(risk ≤ α) ≥ 1 − δ — each up to its Monte-Carlo error,
    with the risk read exactly (the pool's per-knob risk is known) and by `summarize`."""
    rng = np.random.default_rng(1)
    risk = np.linspace(0.0, 0.2, 21)
    errors, cost = _pool(10000, risk, rng)
    alpha, delta, n, reps = 0.05, 0.1, 200, 300
    for d in (None, delta):
        r = validity.resplit(errors, cost, alpha, d, n, reps, seed=2)
        true = risk[r["index"]]
        if d is None:
            assert true.mean() <= alpha + 2 * true.std() / math.sqrt(reps)
        else:
            assert np.mean(true <= alpha) >= 1 - delta - 2 * math.sqrt(delta * (1 - delta) / reps)
        s = validity.summarize(r, alpha, d, errors.shape[0] - n)
        assert s["holds"] and s["resplits"] == reps and 0 <= s["share_within"] <= 1
    # PAC pays for its strength: it never deploys a cheaper knob on average.
    marg = validity.resplit(errors, cost, alpha, None, n, reps, seed=2)
    pac = validity.resplit(errors, cost, alpha, delta, n, reps, seed=2)
    assert pac["index"].mean() < marg["index"].mean() and pac["cost"].mean() > marg["cost"].mean()


def test_summarize_says_when_a_guarantee_fails():
    r = {"miscoverage": np.full(100, 0.08), "cost": np.ones(100), "feasible": np.ones(100, bool),
         "index": np.zeros(100, int)}
    assert not validity.summarize(r, 0.05, None, 1000)["holds"]
    assert not validity.summarize(r, 0.05, 0.1, 1000)["holds"]
    r["miscoverage"] = np.full(100, 0.01)
    assert validity.summarize(r, 0.05, None, 1000)["holds"]
    assert validity.summarize(r, 0.05, 0.1, 1000)["holds"]


def test_pool_outcomes_equal_a_plain_walk_of_the_family():
    manifest, problems = synthetic.generate(synthetic.SyntheticConfig(num_problems=120, roots_per_problem=2))
    trees = trace.pack(manifest, problems)
    fam = baselines.threshold_family(trees, 0, grid_size=9)
    pool = np.concatenate([trees.split_indices("cal"), trees.split_indices("test")])
    errors, cost = validity.pool_outcomes(trees, fam, pool)
    fw = guarantee.walk_family(trees, env.to_device(trees), fam, env.instances(trees, pool))
    np.testing.assert_allclose(errors, fw.cal_errors)
    # Cost per problem against a plain loop over instances and grid values.
    pi, ri = env.instances(trees, pool)
    for g_i, g in enumerate(fam.grid[:3]):
        w = env.walk(env.to_device(trees), pi, ri, fam.actions(g)[pi], env.horizon(trees))
        per = {}
        for p, c in zip(pi, np.asarray(w.total_cost), strict=True):
            per.setdefault(int(p), []).append(float(c))
        want = [np.mean(per[p]) for p in sorted(per)]
        np.testing.assert_allclose(cost[:, g_i], want, rtol=1e-6)


def test_data_draws_equal_a_plain_loop_over_resplits():
    """Each draw: a permutation of the cal ∪ test pool into the original sizes; each method's
    knob by `conformal_choice` on the draw's calibration rows; its test cost over large-only's
    test cost and test coverage — written out draw by draw; several families of one method are
    averaged per draw."""
    manifest, problems = synthetic.generate(synthetic.SyntheticConfig(num_problems=160))
    trees = trace.pack(manifest, problems)
    fams = {"threshold": [baselines.threshold_family(trees, 0, grid_size=7)],
            "two": [baselines.random_family(trees, s, grid_size=5) for s in (1, 2)]}
    out = validity.data_draws(trees, fams, [0.1, 0.2], resplits=4, seed=3)
    pool = np.sort(np.concatenate([trees.split_indices("cal"), trees.split_indices("test")]))
    n_cal = len(trees.split_indices("cal"))
    rng = np.random.default_rng(3)
    orders = [rng.permutation(len(pool)) for _ in range(4)]
    for alpha in (0.1, 0.2):
        for name, families in fams.items():
            got = out["alphas"][alpha][name]
            for r, order in enumerate(orders):
                cal, test = order[:n_cal], order[n_cal:]
                ratios, covers = [], []
                for fam in families:
                    errors, cost = validity.pool_outcomes(trees, fam, pool)
                    j, _ = guarantee.conformal_choice(errors[cal], alpha)
                    ratios.append(cost[test, j].mean() / trees.solo_cost[pool[test], -1].mean())
                    covers.append(1 - errors[test, j].mean())
                assert got["ratio"][r] == pytest.approx(np.mean(ratios))
                assert got["coverage"][r] == pytest.approx(np.mean(covers))
    assert out["alphas"][0.1]["threshold"]["seed_sd"] == 0.0
    assert out["alphas"][0.1]["two"]["seed_sd"] > 0.0
