"""The routing benchmark's orchestration and arithmetic (a tiny world; the suite itself is a
benchmark, `python -m launch.benchmark_routing`)."""

import numpy as np
import pytest

from jaxroute import exact, suite, synthetic, trace


def _rec(world, a, method, kind, cost, cov, ci, data_seed=0, train_seed=None, large=10.0):
    return {"world": world, "data_seed": data_seed, "alpha": a, "method": method, "kind": kind,
            "train_seed": train_seed, "coverage": cov, "coverage_ci": ci, "accuracy": 50.0,
            "cost": cost, "cost_large": cost / large}


def test_aggregate_and_targets_arithmetic():
    recs = [_rec("w", 0.1, suite.ROUTER, "router", c, 0.9, [0.85, 0.95], train_seed=s)
            for s, c in enumerate((4.0, 4.2, 3.8))]
    recs += [_rec("w", 0.1, "confidence threshold", "baseline", 5.0, 0.9, [0.86, 0.93]),
             _rec("w", 0.1, suite.REFERENCES[0], "reference", 4.1, 0.9, [0.86, 0.93]),
             _rec("w", 0.1, suite.REFERENCES[1], "reference", 3.9, 0.9, [0.86, 0.93]),
             _rec("w", 0.1, suite.ORACLE, "oracle", 2.0, 0.9, [0.86, 0.93])]
    assert suite.aggregate(recs)[0]["cost_perfect"] is None  # a world without rollouts
    # The perfect-risk reference is a limit: its own ratio, never the "best reference".
    recs.append(_rec("w", 0.1, suite.PERFECT, "limit", 3.2, 0.9, [0.86, 0.93]))
    rows = {r["method"]: r for r in suite.aggregate(recs)}
    me = rows[suite.ROUTER]
    assert me["cost_large"] == pytest.approx(0.4) and me["runs"] == 3
    assert me["cost_large_sd"] == pytest.approx(np.std([0.4, 0.42, 0.38]))
    assert me["cost_reference"] == pytest.approx(4.0 / 3.9)
    assert me["cost_oracle"] == pytest.approx(2.0)
    assert me["cost_perfect"] == pytest.approx(4.0 / 3.2)
    assert me["train_seed_sd"] == pytest.approx(np.std([4.0, 4.2, 3.8]) / 4.0)
    assert me["ci_reaches_target"] == 1.0
    (v,) = suite.targets(list(rows.values()))
    assert v["beats_baselines"] and v["reference_ok"] and v["coverage_ok"] and v["seed_sd_ok"]
    assert v["vs_reference"] == pytest.approx(4.0 / 3.9)
    # A router 10 % above the best reference misses that target.
    recs2 = [dict(r, cost=r["cost"] * 1.1, cost_large=r["cost_large"] * 1.1) if r["method"] ==
             suite.ROUTER else r for r in recs]
    (v2,) = suite.targets(suite.aggregate(recs2))
    assert not v2["reference_ok"]


def test_run_world_reports_every_method_at_every_alpha():
    m, probs = synthetic.generate(synthetic.family_config(0.75, 0.9, seed=2, num_problems=300,
                                                          max_steps=6))
    trees = trace.pack(m, probs)
    gain = np.random.default_rng(0).uniform(-0.2, 0.5, trees.step_cost.shape)
    recs = suite.run_world("tiny", 0, m, trees, (0.1, 0.2), (0, 1),
                           exact.ExactConfig(iterations=5), paper=False, gain=gain,
                           log=lambda _: None)
    methods = {(r["alpha"], r["method"]) for r in recs}
    for a in (0.1, 0.2):
        for name in (suite.ROUTER, *suite.BASELINES, *suite.REFERENCES, suite.PERFECT,
                     suite.ORACLE):
            assert (a, name) in methods, (a, name)
    assert {r["kind"] for r in recs if r["method"] == suite.PERFECT} == {"limit"}
    routers = [r for r in recs if r["method"] == suite.ROUTER]
    assert sorted((r["alpha"], r["train_seed"]) for r in routers) == [
        (0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    assert all(0.0 <= r["coverage"] <= 1.0 and r["cost"] > 0 for r in recs)
