"""Reference policies, the one calibration rule, and the synthetic benchmark families."""

import numpy as np
import pytest

from jaxroute import baselines, env, guarantee, references, stats, synthetic, trace


@pytest.fixture(scope="module")
def world():
    m, probs = synthetic.generate(synthetic.family_config(0.75, 0.75, seed=5, num_problems=500,
                                                          max_steps=10))
    return m, trace.pack(m, probs)


def test_conformal_choice_is_the_brute_force_rule():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, g = rng.integers(20, 80), rng.integers(2, 12)
        errors = (rng.random((n, g)) < np.linspace(0, 0.3, g)).astype(float)
        alpha = rng.uniform(0.02, 0.3)
        mono = np.maximum.accumulate(errors, axis=1)
        ok = [(mono[:, j].sum() + 1) / (n + 1) <= alpha for j in range(g)]
        want = max((j for j in range(g) if all(ok[:j + 1])), default=0)
        idx, feasible = guarantee.conformal_choice(errors, alpha)
        assert idx == want and feasible == ok[0]


def test_family_configs_hit_their_coverage_and_auroc():
    for cov, auc in ((0.6, 0.75), (0.9, 0.6), (0.75, 0.9)):
        m, probs = synthetic.generate(synthetic.family_config(cov, auc, seed=1,
                                                              num_problems=3000, max_steps=12))
        t = trace.pack(m, probs)
        small_cov = (t.solo_correct[:, 0] | ~t.solo_correct[:, -1]).mean()
        assert small_cov == pytest.approx(cov, abs=0.03)
        # Wrong step = the first error of a root that could not solve the problem: the step
        # after which the large model from the same prefix is no longer reliably right is not
        # observable, so use the generator's own marker — the lowest-confidence step of a wrong
        # root vs the steps of right roots.
        conf = t.features[..., 0]
        valid = env.node_mask(t)
        right = t.seg_correct[:, :, None] & valid
        low = np.where(valid, conf, np.inf).min(-1)[~t.seg_correct]
        scores = np.concatenate([-low, -conf[right]])
        labels = np.concatenate([np.ones(low.size, bool), np.zeros(int(right.sum()), bool)])
        # The minimum over a wrong root's steps is biased low, so its AUROC exceeds the
        # per-step one; it must at least order as the knob does.
        assert stats.auroc(scores, labels) > auc - 0.05
    with pytest.raises(ValueError):
        synthetic.family_config(0.05, 0.75)


def test_risk_labels_and_classifier_rank_wrong_segments_higher(world):
    m, trees = world
    labels = references.risk_labels(trees)
    assert labels[~trees.solo_correct[:, -1]].sum() == 0  # R_M = 0: nothing to cover
    risk = references.fit_risk_to_go(trees, steps=200)
    scores = references.risk_scores(risk, trees)
    test = trees.split == 2
    valid = env.node_mask(trees) & test[:, None, None]
    # Per node the label is its segment's fate, visible mostly at the error step and in the
    # difficulty: well above chance on held-out problems, not a perfect ranking.
    assert stats.auroc(scores[valid], labels[valid]) > 0.55


def test_threshold_table_is_train_feasible_and_no_worse_than_the_best_uniform(world):
    m, trees = world
    alpha = 0.1
    table = references.fit_threshold_table(trees, m.feature_names, alpha, levels=10,
                                           max_passes=2)
    train = trees.subset(trees.split_indices("train"))
    dev = env.to_device(train)
    problems, roots = env.instances(train, np.arange(train.num_problems))

    def objective(acts):
        w = env.walk(dev, problems, roots, acts[problems], env.horizon(train))
        miss = (~np.asarray(w.correct) & train.solo_correct[problems, -1]).mean()
        return float(np.asarray(w.total_cost).mean()), miss

    cost, miss = objective(table.actions(train))
    assert miss <= alpha + 1e-9
    uniform = []
    for j in range(len(table.levels)):
        c, mi = objective(baselines.escalate_where(train, train.features[..., 0]
                                                   < table.levels[j]))
        if mi <= alpha:
            uniform.append(c)
    assert cost <= min(uniform) + 1e-6
    # Its calibration knob is monotone: more shift, more escalation, never less.
    esc = [int((table.actions(trees, k) > 0).sum()) for k in (-3, 0, 3)]
    assert esc[0] <= esc[1] <= esc[2]
