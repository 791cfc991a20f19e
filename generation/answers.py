"""Final-answer extraction and equivalence checking.

- `extract_boxed`: the content of the last `\\boxed{...}` (nested braces handled).
- `gsm8k_gold`: the text after `####`, thousands commas removed.
- `AnswerChecker`: equivalence through math-verify, run in worker *processes* with a hard timeout
  (math-verify uses `signal.alarm`, which only works in a main thread, and a hung sympy call must
  not stall generation). The verdict keeps "unparsed" apart from "incorrect".
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import multiprocessing
import re


class Verdict(enum.StrEnum):
    CORRECT = "correct"
    INCORRECT = "incorrect"
    UNPARSED = "unparsed"  # no \boxed{} answer, or math-verify could not parse it
    TIMEOUT = "timeout"


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` or `\\fbox{…}` in `text`, braces balanced; None if none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def gsm8k_gold(answer: str) -> str | None:
    """GSM8K's gold final answer: the text after `####`, with thousands commas removed."""
    if "####" not in answer:
        return None
    return answer.split("####")[-1].strip().replace(",", "")


def _verify(gold: str, pred: str, dataset: str, timeout: int) -> str:
    """Runs in a worker process (main thread there, so math-verify's signal timeouts work)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if dataset == "gsm8k":
        gold_parsed = parse(gold, extraction_config=[ExprExtractionConfig()],
                            parsing_timeout=timeout)
    else:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"$\\boxed{{{pred}}}$",
                        extraction_config=[LatexExtractionConfig(boxed_match_priority=0),
                                           ExprExtractionConfig()],
                        parsing_timeout=timeout)
    if not pred_parsed:
        return Verdict.UNPARSED.value
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} could not be parsed")
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    return (Verdict.CORRECT if ok else Verdict.INCORRECT).value


class AnswerChecker:
    """Checks solutions against gold answers in a pool of worker processes.

    Args:
      workers: processes in the pool.
      timeout: seconds per check (math-verify's own timeout inside, and a hard limit outside;
        a check that exceeds it gets Verdict.TIMEOUT and the pool is rebuilt).
    """

    def __init__(self, workers: int = 2, timeout: int = 5, recycle_after: int = 5000):
        self.workers, self.timeout, self.recycle_after = workers, timeout, recycle_after
        self._tasks = 0
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # Not max_tasks_per_child: on CPython 3.11 recycling workers while futures are
            # pending can deadlock the pool. We rebuild it ourselves between batches instead.
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"))
            self._tasks = 0
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """Verdicts for (solution text, gold, dataset) triples, in order."""
        out: list[Verdict | None] = [None] * len(items)
        futures = {}
        for i, (solution, gold, dataset) in enumerate(items):
            pred = extract_boxed(solution)
            if pred is None or not pred:
                out[i] = Verdict.UNPARSED
                continue
            futures[i] = self._get_pool().submit(_verify, gold, pred, dataset, self.timeout)
        hung = False
        for i, fut in futures.items():
            try:
                out[i] = Verdict(fut.result(timeout=self.timeout + 10))
            except cf.TimeoutError:
                out[i], hung = Verdict.TIMEOUT, True
            except cf.process.BrokenProcessPool:
                out[i], hung = Verdict.TIMEOUT, True
        self._tasks = getattr(self, "_tasks", 0) + len(futures)
        if hung or self._tasks > self.recycle_after:  # stuck in sympy, or memory growth
            self.close()
        return out  # type: ignore[return-value]

    def check(self, solution: str, gold: str, dataset: str) -> Verdict:
        return self.check_many([(solution, gold, dataset)])[0]
