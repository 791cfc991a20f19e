"""Entry points (`launch.common.run`, through subprocesses: tests never import launch scripts):
bad input is one line, a bug keeps its traceback, library logs stay quiet unless asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(body: str, *args: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom absl import logging\nfrom launch import common\n"
            "from jaxroute.errors import InputError\n"
            f"def main(argv):\n    logging.info('library chatter')\n{body}\n"
            "sys.argv = ['prog', *sys.argv[1:]]\ncommon.run(main)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback():
    user = _run("    raise InputError('trees.jsonl: line 3: field x missing')")
    assert user.returncode == 2
    assert user.stderr.strip() == "error: trees.jsonl: line 3: field x missing"
    bug = _run("    return int('not a number')")  # a genuine bug: a plain ValueError
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and "invalid literal for int()" in bug.stderr


def test_library_logs_are_quiet_unless_verbosity_is_given():
    quiet = _run("    print('result')")
    assert quiet.returncode == 0 and quiet.stdout.strip() == "result"
    assert "library chatter" not in quiet.stderr
    loud = _run("    print('result')", "--verbosity=0")
    assert "library chatter" in loud.stderr
