"""A procedural multi-step arithmetic word-problem task with reference solutions in the paper's
style ("\\n\\n"-separated steps, final `\\boxed{}`), seeded, with difficulty levels.

Difficulty level d (1–5) = number of operations. Each step of a solution applies one operation:
"8 + 5 = 13". Start values and addends are below 50; multiplication (by 2 or 3) only below 61.
Questions are terse ("Ada has 27 coins. Gets 8. Gives 22. How many?") to keep the character-level
sequences short enough for CPU training.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from generation.traces.datasets import Problem

NAMES = ("Ada", "Ben", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo")
ITEMS = ("apples", "coins", "cards", "books", "pens", "shells")
LEVELS = (1, 2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class TaskProblem:
    problem: Problem
    solution_steps: tuple[str, ...]  # reference steps, the last one holds \boxed{}


def _make(rng: np.random.Generator, level: int, index: int, split: str, seed: int) -> TaskProblem:
    name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    value = int(rng.integers(2, 50))
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(level):
        op = rng.choice(["+", "-", "*"], p=[0.45, 0.35, 0.2])
        if op == "*" and value > 60:
            op = "-"
        if op == "+":
            k = int(rng.integers(2, 50))
            sentences.append(f"Gets {k}.")
            new = value + k
        elif op == "-":
            k = int(rng.integers(1, max(2, value)))
            sentences.append(f"Gives {k}.")
            new = value - k
        else:
            k = int(rng.integers(2, 4))
            sentences.append(f"Times {k}.")
            new = value * k
        steps.append(f"{value} {op} {k} = {new}")
        value = new
    steps[-1] = steps[-1] + f" \\boxed{{{value}}}"
    question = " ".join(sentences) + " How many?"
    pid = f"arith-s{seed}-{split}-{index:05d}"  # the seed too: a workdir holds one task
    return TaskProblem(Problem(pid, question, str(value), "arith", float(level)), tuple(steps))


def generate(n: int, seed: int, split: str = "test",
             level_probs: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)) -> list[TaskProblem]:
    """`n` problems, deterministic given (seed, split)."""
    stream = {"train": 0, "cal": 1, "test": 2, "lm": 3}.get(split, 4)
    rng = np.random.default_rng([seed, stream])
    levels = rng.choice(LEVELS, size=n, p=level_probs)
    return [_make(rng, int(lv), i, split, seed) for i, lv in enumerate(levels)]


def check_step(step: str) -> bool | None:
    """Rule-based step verifier: every "a op b = c" in the step must hold exactly.

    Returns None when the step holds no equation (nothing to check)."""

    eqs = re.findall(r"(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)", step)
    if not eqs:
        return None
    for a, op, b, c in eqs:
        a, b, c = int(a), int(b), int(c)
        if {"+": a + b, "-": a - b, "*": a * b}[op] != c:
            return False
    return True
