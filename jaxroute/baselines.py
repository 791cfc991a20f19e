"""Routing baselines that can be replayed on trace trees, and the exact oracle.

Each baseline is a rule that picks an action per tree node (`[N, S, T]` int), which `env.walk`
then follows — the same machinery as the trained router, so every method is scored identically:

- random escalation / confidence threshold (small-only and large-only are the recorded solo runs);
- STEER (Lee et al. 2026): a two-component 1-D Gaussian mixture over the small model's confidence
  score per step index (EM, steps ≥ `max_bucket` pooled); escalate, sticky, at the first step whose
  posterior probability of the high-confidence component falls below τ;
- the oracle (`oracle_costs`): the cheapest path per instance that ends correct, by dynamic
  programming over the tree — a lower bound no router can beat.

Escalations go to the largest model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxroute import env, stats
from jaxroute.errors import InputError
from jaxroute.guarantee import Family, quantile_grid, train_nodes
from jaxroute.trace import PackedTrees

GRID = tuple(round(0.1 * i, 1) for i in range(11))  # the paper's 0.1-step threshold grid
# RSD's and SpecReason's grid: the paper's, refined near 1, where a score rule calibrated for a
# small α lives (with the 0.1 grid alone the next point after "rewrite every step" can be far
# too cheap to be certified; decision 92).
SCORE_GRID = tuple(sorted(set(GRID) | {0.95, 0.975, 0.99}))


def escalate_where(trees: PackedTrees, flag: np.ndarray) -> np.ndarray:
    """Node actions: the largest model where `flag` `[P, S, T]` is set, else continue."""
    model = np.broadcast_to(trees.seg_model[..., None], flag.shape)
    return np.where(flag, trees.num_models - 1, model).astype(np.int32)


def confidence_threshold(trees: PackedTrees, feature: int, tau: float) -> np.ndarray:
    """Escalate at the first step whose confidence feature is below τ."""
    return escalate_where(trees, trees.features[..., feature] < tau)


# ------------------------------------------------------------------------------------------------
# STEER's Gaussian mixture


class Mixture(NamedTuple):
    """Two-component 1-D Gaussian mixtures, one per bucket. Arrays `[G, 2]`; component 1 has the
    larger mean."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray


def fit_mixture(x: np.ndarray, iters: int = 200, min_std: float = 1e-3) -> Mixture:
    """EM for a two-component Gaussian mixture on 1-D data `x` (one bucket). Deterministic init
    at the 25th/75th percentiles."""
    x = np.asarray(x, np.float64)
    if x.size < 2:
        raise InputError("fit_mixture needs at least 2 points")
    mu = np.percentile(x, [25, 75]).astype(np.float64)
    sd = np.full(2, max(x.std(), min_std))
    w = np.array([0.5, 0.5])
    for _ in range(iters):
        logp = (np.log(w) - np.log(sd) - 0.5 * ((x[:, None] - mu) / sd) ** 2)
        logp -= logp.max(1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0) + 1e-12
        w = nk / nk.sum()
        mu = (r * x[:, None]).sum(0) / nk
        sd = np.sqrt(np.maximum((r * (x[:, None] - mu) ** 2).sum(0) / nk, min_std**2))
    order = np.argsort(mu)
    return Mixture(w[order][None], mu[order][None], sd[order][None])


def posterior_high(mix: Mixture, x: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """P(high-confidence component | x) for each x with its bucket index."""
    w, mu, sd = mix.weights[bucket], mix.means[bucket], mix.stds[bucket]
    logp = np.log(w) - np.log(sd) - 0.5 * ((x[..., None] - mu) / sd) ** 2
    logp -= logp.max(-1, keepdims=True)
    p = np.exp(logp)
    return p[..., 1] / p.sum(-1)


class Steer(NamedTuple):
    mixture: Mixture  # one per step-index bucket
    feature: int  # index of the confidence feature
    step_feature: int  # index of the step-index feature
    max_bucket: int


def fit_steer(trees: PackedTrees, confidence: int, step_index: int,
              max_bucket: int = 10) -> Steer:
    """Fit STEER's per-step mixtures on every valid model-0 step of `trees` (the train split)."""
    valid = env.node_mask(trees) & (trees.seg_model[..., None] == 0)
    x = trees.features[..., confidence][valid]
    b = np.minimum(trees.features[..., step_index][valid].astype(int), max_bucket)
    fits = []
    pooled = fit_mixture(x)
    for k in range(max_bucket + 1):
        xs = x[b == k]
        fits.append(fit_mixture(xs) if xs.size >= 20 else pooled)  # too few points: pooled fit
    mix = Mixture(*(np.concatenate([f[i] for f in fits]) for i in range(3)))
    return Steer(mix, confidence, step_index, max_bucket)


def fit_steer_on_train(trees: PackedTrees, feature_names) -> Steer:
    """STEER fitted on the train split of `trees` on its best single score
    (`best_score_feature`) and the `step_index` feature, found by name."""
    names = list(feature_names)
    return fit_steer(trees.subset(trees.split_indices("train")),
                     best_score_feature(trees, names), names.index("step_index"))


# Single scores of a step, each higher = more confident (decision 91): S_os/S_API and the
# statistics of the small model's own token distribution.
SCORE_FEATURES = ("confidence", "min_logprob", "low3_logprob", "neg_entropy", "min_margin")


def best_score_feature(trees: PackedTrees, feature_names) -> int | None:
    """The index of the single score (`SCORE_FEATURES`, as far as the trees have them) that best
    ranks the train split's model-0 nodes whose continuation leaves the answer uncovered (the
    large model right, the segment wrong) — AUROC of the negated score — so the single-score
    baselines use the best signal there is (decision 91). None when the trees have none."""
    names = list(feature_names)
    cands = [names.index(n) for n in SCORE_FEATURES if n in names]
    if len(cands) <= 1:
        return cands[0] if cands else None
    train = trees.subset(trees.split_indices("train"))
    valid = env.node_mask(train) & (train.seg_model[..., None] == 0)
    risky = (train.solo_correct[:, -1][:, None] & ~train.seg_correct)[..., None]
    y = np.broadcast_to(risky, valid.shape)[valid]
    aucs = [stats.auroc(-train.features[..., i][valid], y) for i in cands]
    aucs = [a if np.isfinite(a) else -1.0 for a in aucs]
    return cands[int(np.argmax(aucs))]


def steer_posterior(steer: Steer, features: np.ndarray) -> np.ndarray:
    """STEER's score: the posterior of the high-confidence component for step features
    `[..., D]` (every node of packed trees offline, a batch of drafts online). `[...]`."""
    b = np.clip(features[..., steer.step_feature].astype(int), 0, steer.max_bucket)
    return posterior_high(steer.mixture, features[..., steer.feature], b)


# ------------------------------------------------------------------------------------------------
# Oracle


class OracleCosts(NamedTuple):
    cheapest: np.ndarray  # [P, J] cost of the cheapest path from each root (any outcome)
    cheapest_correct: np.ndarray  # [P, J] cost of the cheapest correct path (inf if none)
    cheapest_is_correct: np.ndarray  # [P, J] bool, is the cheapest path itself correct


def oracle_costs(trees: PackedTrees) -> OracleCosts:
    """Dynamic programming over every problem's tree (all problems at once, numpy)."""
    p_n, s_n, t_n = trees.step_cost.shape
    k_n = trees.num_models
    inf = np.inf
    # best_*[p, s, t]: cheapest cost from node (s, t), step t already paid.
    best_any = np.full((p_n, s_n, t_n), inf)
    best_any_ok = np.zeros((p_n, s_n, t_n), bool)  # outcome of that cheapest path
    best_cor = np.full((p_n, s_n, t_n), inf)
    rows = np.arange(p_n)
    for s in reversed(range(s_n)):  # children always have larger segment indices
        length = trees.seg_len[:, s]
        model = trees.seg_model[:, s]
        for t in reversed(range(t_n)):
            live = t < length
            last = t == length - 1
            # continue
            if t + 1 < t_n:
                nxt_cost = trees.step_cost[:, s, t + 1]
                c_any = np.where(last, 0.0, nxt_cost + best_any[:, s, t + 1])
                c_ok = np.where(last, trees.seg_correct[:, s], best_any_ok[:, s, t + 1])
                c_cor = np.where(last, np.where(trees.seg_correct[:, s], 0.0, inf),
                                 nxt_cost + best_cor[:, s, t + 1])
            else:
                c_any = np.zeros(p_n)
                c_ok = trees.seg_correct[:, s].copy()
                c_cor = np.where(trees.seg_correct[:, s], 0.0, inf)
            options = [(c_any, c_ok, c_cor)]
            for kp in range(1, k_n):
                ok_model = kp > model
                child = trees.branch_seg[:, s, t, kp]
                is_seg = child >= 0
                ch = np.maximum(child, 0)
                seg_any = trees.step_cost[rows, ch, 0] + best_any[rows, ch, 0]
                seg_ok = best_any_ok[rows, ch, 0]
                seg_cor = trees.step_cost[rows, ch, 0] + best_cor[rows, ch, 0]
                leaf_cost = trees.branch_cost[:, s, t, kp]
                leaf_ok = trees.branch_correct[:, s, t, kp]
                e_any = np.where(is_seg, seg_any, leaf_cost)
                e_ok = np.where(is_seg, seg_ok, leaf_ok)
                e_cor = np.where(is_seg, seg_cor, np.where(leaf_ok, leaf_cost, inf))
                options.append((np.where(ok_model, e_any, inf), e_ok & ok_model,
                                np.where(ok_model, e_cor, inf)))
            anys = np.stack([o[0] for o in options])
            pick = np.argmin(anys, axis=0)
            best_any[:, s, t] = np.where(live, anys[pick, rows], inf)
            best_any_ok[:, s, t] = np.where(live, np.stack([o[1] for o in options])[pick, rows],
                                            False)
            best_cor[:, s, t] = np.where(live, np.min(np.stack([o[2] for o in options]), 0), inf)
    j_n = int(trees.num_roots.max())
    root_cost = trees.step_cost[:, :j_n, 0]
    return OracleCosts(cheapest=root_cost + best_any[:, :j_n, 0],
                       cheapest_correct=root_cost + best_cor[:, :j_n, 0],
                       cheapest_is_correct=best_any_ok[:, :j_n, 0])


# ------------------------------------------------------------------------------------------------
# The baselines as families (calibrated by `guarantee.conformal_choice`)


def threshold_family(trees: PackedTrees, confidence: int, grid_size: int = 201) -> Family:
    conf = trees.features[..., confidence][train_nodes(trees)]
    return Family("confidence threshold",
                  lambda tau: confidence_threshold(trees, confidence, tau),
                  quantile_grid(conf, grid_size, descending=True))



def steer_family(trees: PackedTrees, steer: Steer, grid_size: int = 201) -> Family:
    post = steer_posterior(steer, trees.features)
    return Family("STEER", lambda tau: escalate_where(trees, post < tau),
                  quantile_grid(post[train_nodes(trees)], grid_size, descending=True))



def random_family(trees: PackedTrees, seed: int, grid_size: int = 101) -> Family:
    """Escalate at each node with probability p; one uniform draw per node for every p, so the
    escalation sets are nested in p."""
    u = np.random.default_rng(seed).random(trees.step_cost.shape)
    return Family("random escalation", lambda p: escalate_where(trees, u < p),
                  [float(p) for p in np.linspace(1.0, 0.0, grid_size)])



def baseline_families(trees: PackedTrees, feature_names: Sequence[str], seed: int = 0
                      ) -> list[Family]:
    """Random escalation, the confidence threshold and STEER (fitted on the train split), on the
    best single score of the trees (`best_score_feature`), found by name."""
    names = list(feature_names)
    fams = [random_family(trees, seed)]
    score = best_score_feature(trees, names)
    if score is not None:
        fams.append(threshold_family(trees, score))
        if "step_index" in names:
            fams.append(steer_family(trees, fit_steer_on_train(trees, names)))
    return fams
