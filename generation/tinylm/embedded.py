"""The embedded default's pieces for the main job (`launch.experiment`): the procedural task's
problems in three splits, their trace trees from the two tiny LMs, and the live comparison's
rows (the exported router, the large model sampled afresh, RSD and SpecReason with the stand-in
PRM and judge).
"""

from __future__ import annotations

from pathlib import Path

from generation import comparison, costs, rules, tracegen
from generation.answers import AnswerChecker
from generation.datasets import Problem
from generation.tinylm import scorers, task
from jaxroute import baselines

SPLIT_NAMES = ("train", "cal", "test")


def problems_and_splits(sizes: dict[str, int], seed: int
                        ) -> tuple[list[Problem], dict[str, str]]:
    """The task's problems for each split (`sizes[split]` each) and problem id → split."""
    problems, splits = [], {}
    for split, n in sizes.items():
        for p in task.generate(n, seed, split):
            problems.append(p.problem)
            splits[p.problem.problem_id] = split
    return problems, splits


def rule_verifier(items):
    """The task's rule verifier: every equation in the step holds (None: no equation)."""
    return [task.check_step(step) for _, _, step in items]


# Guards of the tiny models: solutions of ≤ 5 operations, one short equation per step.
GEN_CONFIG = dict(max_steps=8, max_tokens_per_step=64, max_tokens_per_solution=160)


def make_trace_set(backends, problems: list[Problem], splits: dict[str, str], out: Path,
                   seed: int, checker: AnswerChecker) -> Path:
    """Trace trees of the tiny LMs with the rule verifier's labels, resumably, into `out`."""
    gen = tracegen.TraceGenerator(backends, checker, rule_verifier,
                                  tracegen.GenConfig(chunk=50, seed=seed, **GEN_CONFIG),
                                  [costs.Price(0, 0, 0)] * len(backends))
    return tracegen.run(gen, problems, splits, out,
                        {"task": "procedural arithmetic (generation.tinylm.task)",
                         "models": [b.name for b in backends], "seed": seed})


def live_methods(router, backends) -> list[comparison.LiveMethod]:
    """The main job's live rows: the large model sampled afresh (its coverage against the trees'
    R_M is < 1: two samples of one model disagree — the level to read the others against), the
    exported router, and RSD / SpecReason on the paper's 0.1 grid."""
    k = len(backends)
    large = "model 1 only (online, fresh sample)"
    out = [comparison.LiveMethod(large, rules.FixedRule(large, k - 1)),
           comparison.LiveMethod("TCPO router (ours, online)",
                                 rules.RouterRule(router, name="TCPO router (ours, online)"),
                                 threshold=router.kappa)]
    for name, scorer in (("RSD", scorers.load_prm()), ("SpecReason", scorers.TinyJudge(backends[-1]))):
        out.append(comparison.LiveMethod(
            f"{name} (online, {scorer.name})", external="yes",
            grid=tuple(reversed(baselines.GRID)),
            family=lambda t, s=scorer, n=name: rules.ScoreRule(s, t, k, name=n)))
    return out
