"""The offline routing environment: walking packed trace trees with a per-node action.

Every node (segment s, step t) of a tree shows the policy the same observation whenever it is
reached, and an episode visits each node at most once. So any policy — stochastic or not — is
fully described by one action per node: sampling an action for every node up front has the same
distribution as sampling on arrival. `walk` then follows the tree with pure gathers, vmapped over
instances, in a `lax.scan` over at most `horizon` decisions.

An *instance* is a (problem, root) pair: problem index into a `PackedTrees` and which sampled
model-0 trajectory to start from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.core import threshold
from jaxroute.trace import PackedTrees
from jaxroute.types import Rollout


def node_mask(trees: PackedTrees) -> np.ndarray:
    """`[P, S, T]` bool, valid nodes."""
    return np.arange(trees.step_cost.shape[2])[None, None] < trees.seg_len[..., None]


class Walk(NamedTuple):
    """What happened on each instance. Decision slots are `[N, H]`, zero/False past the end."""

    seg: jax.Array  # [N, H] int32 segment of decision h
    step: jax.Array  # [N, H] int32 step index within the segment
    model: jax.Array  # [N, H] int32 current model
    action: jax.Array  # [N, H] int32 chosen model
    cost: jax.Array  # [N, H] float32 cost charged by decision h (decision 0 also pays step 0)
    mask: jax.Array  # [N, H] bool
    correct: jax.Array  # [N] bool final answer correct
    total_cost: jax.Array  # [N] float32
    escalation: jax.Array  # [N] int32 decision index of the first escalation, −1 if none


def to_device(trees: PackedTrees) -> PackedTrees:
    return PackedTrees(*(jnp.asarray(a) for a in trees))


def horizon(trees: PackedTrees) -> int:
    """Upper bound on decisions per episode: one segment per model below the largest."""
    return int(trees.step_cost.shape[2]) * (int(trees.num_models) - 1)


def _walk_one(tree: PackedTrees, root: jax.Array, node_action: jax.Array, h: int):
    """Walk one problem's tree (arrays without the problem axis) from `root`."""

    def body(carry, _):
        seg, t, done, correct, esc, idx = carry
        m = tree.seg_model[seg]
        a = jnp.maximum(node_action[seg, t], m)  # actions below the current model are invalid
        cont = a == m
        last = t + 1 >= tree.seg_len[seg]
        child = tree.branch_seg[seg, t, a]
        leaf = ~cont & (child < 0)
        t_next = jnp.minimum(t + 1, tree.step_cost.shape[1] - 1)
        c = jnp.where(cont, jnp.where(last, 0.0, tree.step_cost[seg, t_next]),
                      jnp.where(leaf, tree.branch_cost[seg, t, a],
                                tree.step_cost[jnp.maximum(child, 0), 0]))
        ends = (cont & last) | leaf
        outcome = jnp.where(cont, tree.seg_correct[seg], tree.branch_correct[seg, t, a])
        live = ~done
        out = (seg, t, m, a, jnp.where(live, c, 0.0), live)
        new = (
            jnp.where(live & ~cont & ~leaf, child, seg),
            jnp.where(live, jnp.where(cont, t + 1, 0), t),
            done | ends,
            jnp.where(live & ends, outcome, correct),
            jnp.where(live & ~cont & (esc < 0), idx, esc),
            idx + 1,
        )
        return new, out

    init = (root, jnp.int32(0), jnp.asarray(False), jnp.asarray(False), jnp.int32(-1), jnp.int32(0))
    (_, _, _, correct, esc, _), (seg, t, m, a, c, live) = jax.lax.scan(body, init, None, length=h)
    c = c.at[0].add(tree.step_cost[root, 0])
    return seg, t, m, a, c, live, correct, esc


def gather(trees: PackedTrees, problems: jax.Array) -> PackedTrees:
    """Per-instance tree arrays, `[N, ...]`."""
    return PackedTrees(*(a[problems] for a in trees))


@functools.partial(jax.jit, static_argnames="h")
def walk(trees: PackedTrees, problems: jax.Array, roots: jax.Array, node_action: jax.Array,
         h: int) -> Walk:
    """Follow `node_action` `[N, S, T]` through each instance's tree.

    Args:
      trees: device arrays (`to_device`).
      problems: `[N]` int problem indices.
      roots: `[N]` int root index (< num_roots of the problem).
      node_action: `[N, S, T]` int, the model chosen at each node of the instance's tree.
      h: horizon (static), e.g. `horizon(trees)`.
    """
    sub = gather(trees, problems)
    seg, t, m, a, c, live, correct, esc = jax.vmap(_walk_one, in_axes=(0, 0, 0, None))(
        sub, roots, node_action, h)
    return Walk(seg=seg, step=t, model=m, action=a, cost=c, mask=live, correct=correct,
                total_cost=c.sum(-1), escalation=esc)


NODE_CHUNK = 4096  # trees per policy evaluation: bounds the MLP's activations (decision 81)


def node_log_probs(log_prob_fn: Callable, sub: PackedTrees) -> jax.Array:
    """log π(·|node) for every node of the gathered trees: `[N, S, T, K]`.

    `log_prob_fn(obs [..., D], model [...]) -> [..., K]`. More than `NODE_CHUNK` trees are
    evaluated `NODE_CHUNK` at a time (`lax.map`), so evaluating 100 000 problems does not hold
    every node's hidden activations at once.
    """
    model = jnp.broadcast_to(sub.seg_model[..., None], sub.step_cost.shape)
    if sub.features.shape[0] <= NODE_CHUNK:
        return log_prob_fn(sub.features, model)
    return jax.lax.map(lambda xm: log_prob_fn(*xm), (sub.features, model), batch_size=NODE_CHUNK)


def rollout(trees: PackedTrees, problems, roots, log_prob_fn: Callable, key: jax.Array,
            h: int) -> tuple[Rollout, Walk]:
    """Stochastic rollouts of π on the given instances, as the padded batch `tcpo.update` takes."""
    sub = gather(trees, problems)
    logp = node_log_probs(log_prob_fn, sub)
    node_action = jax.random.categorical(key, logp).astype(jnp.int32)
    w = walk(trees, problems, roots, node_action, h)
    rows = jnp.arange(problems.shape[0])[:, None]
    batch = Rollout(
        obs=sub.features[rows, w.seg, w.step],
        model=w.model,
        action=w.action,
        log_behaviour=logp[rows, w.seg, w.step, w.action],
        cost=w.cost,
        verifier_ok=sub.verifier_ok[rows, w.seg, w.step],
        mask=w.mask,
        correct=w.correct,
        large_wrong=~sub.solo_correct[:, -1],
    )
    return batch, w


def greedy_actions(log_prob_fn: Callable, sub: PackedTrees, kappa: jax.Array) -> jax.Array:
    """Eq. 6 (Γ) at every node: `[N, S, T]` int."""
    probs = jnp.exp(node_log_probs(log_prob_fn, sub))
    model = jnp.broadcast_to(sub.seg_model[..., None], sub.step_cost.shape)
    return threshold.route(probs, kappa, model)


def instances(trees: PackedTrees, problem_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (problem, root) pairs of the given problems: `(problems [N], roots [N])`."""
    problem_idx = np.asarray(problem_idx)
    reps = np.asarray(trees.num_roots)[problem_idx]
    problems = np.repeat(problem_idx, reps)
    roots = np.concatenate([np.arange(r) for r in reps]) if len(reps) else np.zeros(0, int)
    return problems.astype(np.int32), roots.astype(np.int32)
