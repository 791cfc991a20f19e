"""Reference policies: what the features allow, to judge whether the router's learning works.

Both are fitted on the train split of trace trees from the router's own features, then — like
every method — calibrated on the calibration split by the same conformal rule (decision 68):

- **risk to go** (`fit_risk_to_go`): a classifier of "continuing with the current model from
  this node ends uncovered" (the large model is right, the segment's own answer is wrong). The
  policy escalates, to the largest model, at the first node whose predicted risk is ≥ τ.
- **threshold table** (`fit_threshold_table`): the policy class "escalate at the first node whose
  confidence is below τ[step-index bucket, difficulty bin]", searched on the train trees by
  coordinate descent for the lowest exact cost with train miscoverage ≤ α (every candidate is
  evaluated exactly by walking the trees). Its calibration knob shifts every cell's threshold by
  the same number of quantile levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxroute import baselines, env
from jaxroute import networks as nets_lib
from jaxroute.errors import InputError
from jaxroute.guarantee import Family, quantile_grid, train_nodes
from jaxroute.trace import PackedTrees


def _names_index(feature_names, name: str) -> int:
    names = list(feature_names)
    if name not in names:
        raise InputError(f"feature {name!r} not among {names}")
    return names.index(name)


# ------------------------------------------------------------------------------------------------
# Risk to go


class RiskModel(NamedTuple):
    networks: nets_lib.RouterNetworks  # its critic head is the risk logit
    params: dict
    normalizer: nets_lib.Normalizer


def risk_labels(trees: PackedTrees) -> np.ndarray:
    """`[P, S, T]` bool: continuing with the segment's model from this node ends uncovered."""
    large_right = trees.solo_correct[:, -1]
    return (large_right[:, None] & ~trees.seg_correct)[..., None] & env.node_mask(trees)


def fit_risk_to_go(trees: PackedTrees, *, hidden=(32, 32), steps: int = 400, lr: float = 3e-3,
                   seed: int = 0) -> RiskModel:
    """Logistic MLP on every valid train node (features + current model), each problem weighted
    1 over its nodes; full-batch Adam on the binary cross-entropy."""
    train = trees.subset(trees.split_indices("train"))
    mask = env.node_mask(train)
    model = np.broadcast_to(train.seg_model[..., None], mask.shape)
    x = jnp.asarray(train.features[mask])
    m = jnp.asarray(model[mask])
    y = jnp.asarray(risk_labels(train)[mask], jnp.float32)
    per_problem = mask.reshape(mask.shape[0], -1).sum(1)
    w = jnp.asarray((1.0 / np.maximum(per_problem, 1))[np.nonzero(mask)[0]], jnp.float32)
    networks = nets_lib.make_networks(trees.num_models, trees.features.shape[-1], hidden)
    norm = nets_lib.Normalizer.fit(x)
    _, params, _ = nets_lib.init_params(networks, jax.random.PRNGKey(seed))
    opt = optax.adam(lr)

    def loss(p):
        logit = networks.value(p, norm, x, m)
        return jnp.sum(w * optax.sigmoid_binary_cross_entropy(logit, y)) / jnp.sum(w)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return p

    return RiskModel(networks, fit(params), norm)


def risk_scores(risk: RiskModel, trees: PackedTrees) -> np.ndarray:
    """`[P, S, T]` predicted risk at every node."""
    model = np.broadcast_to(trees.seg_model[..., None], trees.step_cost.shape)
    logit = risk.networks.value(risk.params, risk.normalizer, jnp.asarray(trees.features),
                                jnp.asarray(model))
    return np.asarray(jax.nn.sigmoid(logit))


# ------------------------------------------------------------------------------------------------
# Threshold table


@dataclasses.dataclass(frozen=True)
class ThresholdTable:
    levels: np.ndarray  # [J] confidence thresholds, increasing (−inf first: never escalate)
    table: np.ndarray  # [B, D] int level index per (step bucket, difficulty bin)
    step_edges: int  # step indices ≥ step_edges − 1 share the last bucket
    difficulty_edges: np.ndarray  # [D − 1] bin edges of the difficulty feature
    confidence: int  # feature indices
    step_index: int
    difficulty: int

    def cells(self, trees: PackedTrees) -> tuple[np.ndarray, np.ndarray]:
        f = trees.features
        b = np.clip(f[..., self.step_index].astype(int), 0, self.step_edges - 1)
        d = np.searchsorted(self.difficulty_edges, f[..., self.difficulty], side="right")
        return b, d

    def actions(self, trees: PackedTrees, shift: int = 0) -> np.ndarray:
        """Node actions with every cell's level moved by `shift` (positive: escalate more)."""
        b, d = self.cells(trees)
        lv = np.clip(self.table[b, d] + shift, 0, len(self.levels) - 1)
        return baselines.escalate_where(trees, trees.features[..., self.confidence]
                                        < self.levels[lv])


def _walk_many(dev: PackedTrees, problems, roots, actions: np.ndarray, horizon: int):
    """(correct [G, N], cost [G, N]) of stacked node actions `[G, N, S, T]`."""
    walk = jax.vmap(lambda a: env.walk(dev, problems, roots, a, horizon))
    w = walk(jnp.asarray(actions))
    return np.asarray(w.correct), np.asarray(w.total_cost)


def fit_threshold_table(trees: PackedTrees, feature_names, alpha: float, *, levels: int = 16,
                        step_buckets: int = 3, max_passes: int = 3) -> ThresholdTable:
    """Coordinate descent over the table on the train split: per cell, every level is tried (one
    vmapped exact walk) and the cheapest that keeps train miscoverage ≤ α is kept; passes repeat
    until nothing changes. Starts from the cheapest feasible uniform table."""
    conf = baselines.best_score_feature(trees, feature_names)
    if conf is None:
        raise InputError(f"no single score among {list(feature_names)} (one of "
                         f"{baselines.SCORE_FEATURES})")
    step = _names_index(feature_names, "step_index")
    diff = _names_index(feature_names, "difficulty")
    train = trees.subset(trees.split_indices("train"))
    valid = env.node_mask(train)
    c = train.features[..., conf][valid]
    lv = np.unique(np.concatenate([[-np.inf], np.quantile(c, np.linspace(0, 1, levels - 1)),
                                   [np.inf]]))
    dv = train.features[..., diff][valid]
    edges = np.unique(np.quantile(dv, [0.2, 0.4, 0.6, 0.8])) if dv.size else np.zeros(0)
    edges = edges[(edges > dv.min()) & (edges <= dv.max())] if dv.size else edges
    tab = ThresholdTable(lv, np.zeros((step_buckets, len(edges) + 1), int), step_buckets,
                         edges, conf, step, diff)
    dev = env.to_device(train)
    problems, roots = env.instances(train, np.arange(train.num_problems))
    p_dev, r_dev, h = jnp.asarray(problems), jnp.asarray(roots), env.horizon(train)
    large_right = train.solo_correct[problems, -1]
    _, inv, counts = np.unique(problems, return_inverse=True, return_counts=True)
    wts = 1.0 / counts[inv] / len(counts)

    def score(candidates: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        acts = np.stack([dataclasses.replace(tab, table=t).actions(train)[problems]
                         for t in candidates])
        correct, cost = _walk_many(dev, p_dev, r_dev, acts, h)
        miss = ((~correct & large_right) * wts).sum(1)
        return (cost * wts).sum(1), miss

    # Start: the cheapest uniform level that is feasible on train (the top level always is).
    uniform = [np.full_like(tab.table, j) for j in range(len(lv))]
    cost, miss = score(uniform)
    ok = miss <= alpha
    best = int(np.argmin(np.where(ok, cost, np.inf))) if ok.any() else len(lv) - 1
    table, best_cost = uniform[best], float(cost[best])
    for _ in range(max_passes):
        changed = False
        for cell in np.ndindex(*table.shape):
            cands = []
            for j in range(len(lv)):
                t = table.copy()
                t[cell] = j
                cands.append(t)
            cost, miss = score(cands)
            cost = np.where(miss <= alpha, cost, np.inf)
            j = int(np.argmin(cost))
            if cost[j] < best_cost - 1e-9 and j != table[cell]:
                table, best_cost, changed = cands[j], float(cost[j]), True
        if not changed:
            break
    return dataclasses.replace(tab, table=table)


# ------------------------------------------------------------------------------------------------
# The references as families (calibrated by `guarantee.conformal_choice`)


def risk_family(trees: PackedTrees, seed: int = 0) -> Family:
    """The risk-to-go classifier reference (decision 69), fitted on train; α-free."""
    scores = risk_scores(fit_risk_to_go(trees, seed=seed), trees)
    return Family("risk-to-go classifier (reference)",
                  lambda tau: baselines.escalate_where(trees, scores >= tau),
                  quantile_grid(scores[train_nodes(trees)], 201, descending=False))



def table_family(trees: PackedTrees, feature_names: Sequence[str], alpha: float
                 ) -> Family | None:
    """The exact best threshold-table reference at α (decision 69), or None when the trees lack
    its features (confidence, step index, difficulty)."""
    names = list(feature_names)
    if not {"confidence", "step_index", "difficulty"} <= set(names):
        return None
    table = fit_threshold_table(trees, names, alpha)
    shifts = list(range(len(table.levels), -len(table.levels) - 1, -1))
    return Family("threshold table (reference)", lambda k: table.actions(trees, k), shifts)



def reference_families(trees: PackedTrees, feature_names: Sequence[str], alpha: float,
                       seed: int = 0) -> list[Family]:
    """The reference policies of `jaxroute.references` (decision 69), fitted on train."""
    table = table_family(trees, feature_names, alpha)
    return [risk_family(trees, seed)] + ([table] if table is not None else [])


PERFECT_RISK = "perfect-risk reference"


def perfect_risk_family(trees: PackedTrees, gain: np.ndarray, grid_size: int = 201) -> Family:
    """The perfect-risk reference (decision 92): escalate, to the largest model, at the first
    node whose estimated coverage gain of escalating now, `gain` `[P, S, T]` (from fresh
    rollouts at each node; nan where none were made), is ≥ τ. A router whose features told it
    these probabilities exactly could route like this — a limit it could reach, unlike the
    hindsight oracle, which knows the realised samples."""
    known = env.node_mask(trees) & np.isfinite(gain)
    score = np.where(known, gain, -np.inf)
    return Family(PERFECT_RISK, lambda tau: baselines.escalate_where(
        trees, known & (score >= tau)), quantile_grid(gain[known], grid_size, descending=False))
