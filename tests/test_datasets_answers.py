"""Dataset loaders on the real test sets in ../shared/data, and answer extraction/checking."""

import json
from pathlib import Path

import pytest

from generation.traces import answers, datasets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")


@needs_data
def test_loaders_read_the_shared_test_sets():
    gsm = datasets.load("gsm8k", DATA / "gsm8k")
    assert len(gsm) == 1319 and gsm[0].gold == "18" and "Janet" in gsm[0].question
    assert all("," not in p.gold for p in gsm)
    math = datasets.load("math500", DATA / "math500")
    assert len(math) == 500 and math[0].difficulty in {1.0, 2.0, 3.0, 4.0, 5.0}
    assert math[0].problem_id.startswith("test/")
    omni = datasets.load("omnimath", DATA / "omnimath", limit=50)
    assert len(omni) == 50 and all(p.difficulty is not None for p in omni)


def test_bad_records_name_file_line_and_field(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "x #### 3"}) + "\n"
                 + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(datasets.DatasetError, match=r"test.jsonl: line 2: field 'answer'"):
        datasets.load("gsm8k", f)
    f.write_text("{not json\n")
    with pytest.raises(datasets.DatasetError, match="line 1: invalid JSON"):
        datasets.load("gsm8k", f)
    f.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(datasets.DatasetError, match="no final answer"):
        datasets.load("gsm8k", f)
    with pytest.raises(datasets.DatasetError, match="unknown dataset"):
        datasets.load("mnist", f)


def test_split_is_seeded_and_proportional():
    probs = [datasets.Problem(f"p{i}", "q", "1", "x") for i in range(100)]
    a, b = datasets.split(probs, seed=3), datasets.split(probs, seed=3)
    assert a == b and a != datasets.split(probs, seed=4)
    counts = {s: list(a.values()).count(s) for s in ("train", "cal", "test")}
    assert counts == {"train": 50, "cal": 20, "test": 30}


@pytest.mark.parametrize("text,expect", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}} then \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),
    (r"\boxed {a{b}c}", "a{b}c"),
    (r"no answer", None),
    (r"\boxed{unclosed", None),
    (r"\fbox{7}", "7"),
])
def test_extract_boxed(text, expect):
    assert answers.extract_boxed(text) == expect


def test_gsm8k_gold():
    assert answers.gsm8k_gold("work\n#### 1,234") == "1234"
    assert answers.gsm8k_gold("nothing") is None


def test_checker_keeps_unparsed_apart_from_incorrect():
    with answers.AnswerChecker(workers=1, timeout=5) as checker:
        got = checker.check_many([
            (r"... so the answer is \boxed{18}", "18", "gsm8k"),
            (r"\boxed{1,234}", "1234", "gsm8k"),
            (r"\boxed{\frac{1}{2}}", r"0.5", "math500"),
            (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", "math500"),
            (r"\boxed{17}", "18", "gsm8k"),
            ("I give up", "18", "gsm8k"),
        ])
    V = answers.Verdict
    assert got == [V.CORRECT, V.CORRECT, V.CORRECT, V.CORRECT, V.INCORRECT, V.UNPARSED]


def test_an_unparseable_gold_fails_its_own_check_only():
    with answers.AnswerChecker(workers=1, timeout=5) as checker:
        got = checker.check_many([(r"\boxed{3}", "3", "math500"),
                                  (r"\boxed{3}", "", "math500"),  # an empty gold answer
                                  (r"\boxed{4}", "4", "gsm8k")])
    V = answers.Verdict
    assert got == [V.CORRECT, V.ERROR, V.CORRECT] and not V.ERROR.usable
    assert checker.stats["errors"] == 1


SLOW_WORKER = r"""
import json, sys, time
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if job["gold"] == "hang":
        time.sleep(60)
    print(json.dumps({"verdict": "correct"}), flush=True)
"""


def test_a_hung_check_is_retried_then_a_timeout_never_incorrect(tmp_path, monkeypatch):
    import sys

    script = tmp_path / "worker.py"
    script.write_text(SLOW_WORKER)
    monkeypatch.setattr(answers._Worker, "command", (sys.executable, str(script)))
    with answers.AnswerChecker(workers=2, timeout=1, retries=1) as checker:
        got = checker.check_many([(r"\boxed{1}", "1", "gsm8k"), (r"\boxed{1}", "hang", "gsm8k"),
                                  (r"\boxed{2}", "2", "gsm8k")])
        assert got == [answers.Verdict.CORRECT, answers.Verdict.TIMEOUT, answers.Verdict.CORRECT]
        assert checker.stats["timeouts"] == 1 and checker.stats["restarts"] == 2  # try + retry
        assert checker.check(r"\boxed{5}", "5", "gsm8k") == answers.Verdict.CORRECT


def test_workers_that_cannot_start_fail_loudly(monkeypatch):
    monkeypatch.setattr(answers._Worker, "command", ("false",))
    with pytest.raises(answers.WorkerError, match="did not start"):
        answers.AnswerChecker(workers=1, start_timeout=5)


def test_workers_die_with_their_parent(tmp_path):
    """kill -9 of the process that owns a checker leaves no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from generation.traces import answers; c = answers.AnswerChecker(workers=2); "
            "print(' '.join(str(w.proc.pid) for w in c._workers), flush=True); "
            "import time; time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
