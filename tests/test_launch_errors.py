"""What a launcher prints when the environment fails: one line, and nothing is lost."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

from jaxroute import synthetic, traceset

ROOT = Path(__file__).resolve().parents[1]


def _limited(limit_bytes: int):
    def setup():  # writes past the limit fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return setup


def test_a_full_disk_is_one_clear_line_and_the_rerun_recovers(tmp_path):
    """Regression: a full disk ended in a traceback. A write that finds no room (here a file
    size limit, EFBIG, as ENOSPC would on a full disk) is one line naming the file and what to
    do; the data is untouched, and the same command on a roomy disk finishes the job."""
    manifest, problems = synthetic.generate(synthetic.SyntheticConfig(num_problems=60))
    traceset.write_trace_set(tmp_path, manifest, problems)
    trees = tmp_path / "trees.jsonl"
    before = trees.read_bytes()
    with open(trees, "ab") as f:
        f.write(b'{"torn')  # a damaged tail for repair to drop
    cmd = [sys.executable, "-m", "launch.repair", f"--traces={tmp_path}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=_limited(len(before) // 2))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no room on the disk" in lines[0] and "re-run" in lines[0]
    assert trees.read_bytes() == before + b'{"torn'  # nothing was lost or half-written
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert trees.read_bytes() == before and len(traceset.load_trace_set(tmp_path)[1]) == 60
