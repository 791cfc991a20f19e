"""The guarantee: how every method's knob is calibrated, for both guarantees (decisions 68, 88).

A *family* is a routing method with one knob (`Family`: node actions per knob value, the grid
from the safest value to the cheapest). `walk_family` walks it at every grid value on the
calibration instances (and the test ones) with `env.walk`; `conformal_choice` — the one
calibration rule of every method, offline and live — picks the cheapest value whose per-problem
miscoverage passes: marginal (conformal risk control, E[miss] ≤ α) or PAC (Learn then Test,
P(miss ≤ α) ≥ 1 − δ). `check_calibration_size` refuses a calibration set too small to certify
anything, before anything is trained; `guarantee` and `describe_guarantee` are its record and its
one-line description.

Each method builds its own family beside its definition (`learner.router_family`,
`baselines.baseline_families`, `references.reference_families`). Depends only on the core, the
tree environment and `stats`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute import env
from jaxroute.core import calibration
from jaxroute.errors import InputError
from jaxroute.stats import per_problem
from jaxroute.trace import PackedTrees

GUARANTEES = ("marginal", "pac")



def guarantee(alpha: float, delta: float | None = None, n: int | None = None) -> dict[str, Any]:
    """The record of a guarantee: marginal (δ None: E[miscoverage] ≤ α over calibration draws)
    or PAC (P(miscoverage ≤ α) ≥ 1 − δ), with the calibration size it was met on."""
    out: dict[str, Any] = {"kind": "marginal" if delta is None else "pac", "alpha": alpha,
                           "delta": delta}
    if n is not None:
        out["calibration_problems"] = int(n)
    return out



def describe_guarantee(g: dict[str, Any]) -> str:
    """One line a practitioner reads: what the deployed knob promises."""
    if g.get("kind") == "pac":
        return (f"PAC: with probability ≥ {1 - g['delta']:g} over the calibration draw, "
                f"miscoverage ≤ α = {g['alpha']:g}")
    return f"marginal: expected miscoverage ≤ α = {g['alpha']:g} (over calibration draws)"



def check_calibration_size(n: int, alpha: float, delta: float | None = None,
                           where: str = "the calibration split") -> None:
    """Refuse (`InputError`) a calibration set too small for the guarantee to certify any knob
    value, naming the numbers (`core.min_calibration_size`), before anything is trained."""
    need = calibration.min_calibration_size(alpha, delta)
    if n < need:
        what = (f"a PAC guarantee at α = {alpha:g}, δ = {delta:g}" if delta is not None
                else f"a marginal guarantee at α = {alpha:g}")
        raise InputError(f"{where} has {n} problems; {what} needs at least {need} (even with "
                         "no miscoverage at all nothing smaller can be certified): give more "
                         "calibration problems, a larger α" + (" or δ" if delta is not None
                                                                else ""))



def conformal_choice(errors: np.ndarray, alpha: float, delta: float | None = None
                     ) -> tuple[int, bool]:
    """The one calibration rule of every method (decisions 68, 88): `errors` `[n, G]` in [0, 1]
    are per-problem miscoverages on the calibration split at each knob value, the columns
    ordered from the safest value (escalates most) to the cheapest. Returns the index of the
    cheapest value that passes, and whether any does (if none, index 0: the safest). Errors
    `[R, n, G]` calibrate R sets at once (arrays `[R]` back).

    δ None — marginal: the monotone risk passes conformal risk control
    (`core.conformal_threshold`), E[miscoverage] ≤ α. δ given — PAC: Learn-then-Test
    fixed-sequence testing from the safest value (`core.ltt_threshold`; exact binomial p-values
    for {0, 1} rows, Bentkus' bound for averages over several roots), P(miscoverage ≤ α) ≥ 1 − δ.
    """
    e = jnp.asarray(errors, jnp.float32)
    grid = jnp.arange(e.shape[-1], dtype=jnp.float32)
    if delta is None:
        rule = functools.partial(calibration.conformal_threshold, grid=grid, alpha=alpha)
    else:
        binary = bool(np.all((np.asarray(errors) == 0) | (np.asarray(errors) == 1)))
        rule = functools.partial(calibration.ltt_threshold, grid=grid, alpha=alpha, delta=delta,
                                 binary=binary)
    if e.ndim == 3:  # [R, n, G]: R calibration sets at once (the validity benchmark's re-splits)
        idx, feasible = jax.vmap(rule)(e)
        return np.asarray(idx, int), np.asarray(feasible, bool)
    idx, feasible = rule(e)
    return int(idx), bool(feasible)



@dataclasses.dataclass(frozen=True)
class Family:
    """A routing method with one knob, for calibration: `actions(g)` gives node actions `[P, S, T]`
    for every problem of the trees at knob value g; `grid` lists the values from the safest
    (escalates most) to the cheapest."""

    name: str
    actions: Callable[[Any], np.ndarray]
    grid: Sequence[Any]
    external: str = "no"



def walk_grid(trees: PackedTrees, dev: PackedTrees, family: Family, problems: np.ndarray,
              roots: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, cost, escalation), each `[G, N]`, of the family at every grid value on the given
    instances (grid values walked `chunk` at a time in one vmapped call)."""
    h = env.horizon(trees)
    p_dev, r_dev = jnp.asarray(problems), jnp.asarray(roots)
    out = ([], [], [])
    for i in range(0, len(family.grid), chunk):
        acts = np.stack([family.actions(g)[problems] for g in family.grid[i:i + chunk]])
        if len(acts) < chunk:  # one compiled shape for every chunk
            acts = np.concatenate([acts, np.repeat(acts[-1:], chunk - len(acts), 0)])
        w = _walk_many(dev, p_dev, r_dev, jnp.asarray(acts, jnp.int32), h)
        n = min(chunk, len(family.grid) - i)
        for lst, x in zip(out, (w.correct, w.total_cost, w.escalation), strict=True):
            lst.append(np.asarray(x)[:n])
    return tuple(np.concatenate(x) for x in out)  # type: ignore[return-value]



@dataclasses.dataclass
class FamilyWalks:
    """A family walked at every grid value on the calibration and test instances (α-free: one
    walk serves every α's calibration)."""

    family: Family
    cal_errors: np.ndarray  # [n_cal_problems, G] per-problem miscoverage
    test: tuple[np.ndarray, np.ndarray, np.ndarray]  # (correct, cost, escalation), each [G, N]
    test_problems: np.ndarray  # [N]
    large_right: np.ndarray  # [N] R_M of the test instances



def walk_family(trees: PackedTrees, dev: PackedTrees, family: Family, cal, test=None
                ) -> FamilyWalks:
    """Walk `family` on the calibration instances `cal = (problems, roots)` (and on `test`)."""
    pc, rc = cal
    if len(pc) == 0:
        raise InputError("calibration needs problems in the 'cal' split")
    correct, _, _ = walk_grid(trees, dev, family, pc, rc)
    errors = per_problem(((~correct) & trees.solo_correct[pc, -1][None]).T.astype(float), pc)
    if test is None:
        empty = np.zeros((len(family.grid), 0))
        return FamilyWalks(family, errors, (empty.astype(bool), empty, empty.astype(int)),
                           np.zeros(0, int), np.zeros(0, bool))
    pt, rt = test
    return FamilyWalks(family, errors, walk_grid(trees, dev, family, pt, rt), pt,
                       trees.solo_correct[pt, -1])



@functools.partial(jax.jit, static_argnames="h")
def _walk_many(dev: PackedTrees, problems, roots, actions, h: int) -> env.Walk:
    """`env.walk` of stacked node actions `[G, N, S, T]` in one call (compiled once per shape,
    for every family)."""
    return jax.vmap(lambda a: env.walk(dev, problems, roots, a, h))(actions)



def calibrate_family(trees: PackedTrees, dev: PackedTrees, family: Family, cal, alpha: float,
                     delta: float | None = None) -> tuple[int, bool, np.ndarray]:
    """The knob index chosen on the calibration instances by `conformal_choice`, whether it is
    feasible, and the per-problem errors `[n, G]`."""
    fw = walk_family(trees, dev, family, cal)
    idx, feasible = conformal_choice(fw.cal_errors, alpha, delta)
    return idx, feasible, fw.cal_errors



def quantile_grid(values: np.ndarray, n: int, descending: bool) -> list[float]:
    """Knob values at `n` quantiles of `values` plus both infinities, ordered for a method that
    escalates below the knob (`descending`: +inf first) or at/above it (−inf first)."""
    qs = np.quantile(values, np.linspace(0, 1, n)) if values.size else np.zeros(0)
    grid = np.unique(np.concatenate([[-np.inf], qs, [np.inf]]))
    return [float(g) for g in (grid[::-1] if descending else grid)]



def train_nodes(trees: PackedTrees) -> np.ndarray:
    """`[P, S, T]` bool: valid nodes of train-split problems (knob grids come from these)."""
    return env.node_mask(trees) & (trees.split == 0)[:, None, None]
