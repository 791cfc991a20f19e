"""Final-answer extraction and equivalence checking.

- `extract_boxed`: the content of the last `\\boxed{...}` (nested braces handled).
- `gsm8k_gold`: the text after `####`, thousands commas removed.
- `AnswerChecker`: equivalence through math-verify, run in worker *processes* with a hard timeout
  (math-verify uses `signal.alarm`, which only works in a main thread, and a hung sympy call must
  not stall generation). The verdict keeps "unparsed" apart from "incorrect", and a check that
  timed out or failed apart from both.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import select
import subprocess
import sys

from jaxroute.errors import InputError


class Verdict(enum.StrEnum):
    CORRECT = "correct"
    INCORRECT = "incorrect"
    UNPARSED = "unparsed"  # no \boxed{} answer, or math-verify could not parse it
    TIMEOUT = "timeout"  # the check did not finish, even when retried: no verdict
    ERROR = "error"  # the check failed (e.g. an unparseable gold answer): no verdict

    @property
    def usable(self) -> bool:
        """A verdict a label can be made of; TIMEOUT and ERROR make a problem unusable."""
        return self in (Verdict.CORRECT, Verdict.INCORRECT, Verdict.UNPARSED)


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


def verify(gold: str, pred: str, dataset: str, timeout: int) -> str:
    """One check, in a worker process (math-verify's signal timeouts need a main thread)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as mv_verify

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
        raise InputError(f"gold answer {gold!r} could not be parsed")
    ok = mv_verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    return (Verdict.CORRECT if ok else Verdict.INCORRECT).value


class WorkerError(RuntimeError):
    """Answer-check workers could not start: every verdict would be missing."""


class _Worker:
    """One `python -m generation.traces.answer_worker` process: JSON lines in, JSON lines out. It
    imports only math-verify (not the caller's main module), and exits when its stdin closes —
    so it dies with its parent, even on kill -9."""

    command: tuple[str, ...] | None = None  # default: this Python, -m generation.traces.answer_worker

    def __init__(self, start_timeout: float):
        cmd = list(self.command or (sys.executable, "-m", "generation.traces.answer_worker"))
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=True)  # Ctrl-C reaches the parent only; it shuts workers down
        line = self._read(start_timeout)
        if line is None or line.strip() != "ready":
            self.kill()
            raise WorkerError(f"an answer-check worker did not start within {start_timeout:.0f} s"
                              f" (got {line!r}); is math-verify installed?")

    def _read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line or None

    def submit(self, gold: str, pred: str, dataset: str, timeout: int) -> None:
        self.proc.stdin.write(json.dumps({"gold": gold, "pred": pred, "dataset": dataset,
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> Verdict | None:
        line = self._read(timeout)
        if line is None:
            return None
        out = json.loads(line)
        return Verdict(out["verdict"]) if "verdict" in out else Verdict.ERROR

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)


class AnswerChecker:
    """Checks solutions against gold answers in worker processes (decisions 38, 73).

    Workers start eagerly (`start_timeout`, kept outside any check's limit) from a light entry
    point. A check that exceeds `timeout` (+ a grace second) kills its worker, which is
    restarted, and the check is retried `retries` times; if it still does not finish its verdict
    is TIMEOUT — never "incorrect". A check that fails (an unparseable gold answer) is ERROR for
    that item only. Both make the problem unusable (`Verdict.usable`); `stats` counts them.

    Args:
      workers: worker processes.
      timeout: seconds per check.
      start_timeout: seconds a worker may take to start.
      retries: re-tries of a timed-out check.
    """

    def __init__(self, workers: int = 2, timeout: int = 5, start_timeout: float = 120.0,
                 retries: int = 1):
        if workers < 1 or timeout < 1:
            raise InputError("workers ≥ 1 and timeout ≥ 1 are required")
        self.timeout, self.start_timeout, self.retries = timeout, start_timeout, retries
        self.stats = {"checks": 0, "timeouts": 0, "errors": 0, "restarts": 0}
        self._workers: list[_Worker] = []
        try:
            for _ in range(workers):
                self._workers.append(_Worker(start_timeout))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _restart(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.start_timeout)
        self.stats["restarts"] += 1

    def check_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """Verdicts for (solution text, gold, dataset) triples, in order."""
        if not self._workers:
            raise WorkerError("the answer checker is closed")
        out: list[Verdict | None] = [None] * len(items)
        queue = []
        for i, (solution, gold, dataset) in enumerate(items):
            pred = extract_boxed(solution)
            if not pred:
                out[i] = Verdict.UNPARSED
            else:
                queue.append((i, gold, pred, dataset, 0))
        self.stats["checks"] += len(queue)
        busy: dict[int, tuple] = {}  # worker → job
        while queue or busy:
            for w in range(len(self._workers)):
                if w not in busy and queue:
                    job = queue.pop(0)
                    self._workers[w].submit(job[1], job[2], job[3], self.timeout)
                    busy[w] = job
            for w, job in list(busy.items()):
                verdict = self._workers[w].result(self.timeout + 1.0)
                del busy[w]
                if verdict is None:  # hung (or died): a new worker, and the job again
                    self._restart(w)
                    if job[4] < self.retries:
                        queue.insert(0, job[:4] + (job[4] + 1,))
                        continue
                    verdict = Verdict.TIMEOUT
                    self.stats["timeouts"] += 1
                elif verdict is Verdict.ERROR:
                    self.stats["errors"] += 1
                out[job[0]] = verdict
        return out  # type: ignore[return-value]

    def check(self, solution: str, gold: str, dataset: str) -> Verdict:
        return self.check_many([(solution, gold, dataset)])[0]
