"""`python -m launch.results` renders the documents' numbers from run outputs (subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args):
    return subprocess.run([sys.executable, "-m", "launch.results", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_results_are_rendered_from_run_outputs(tmp_path):
    runs = tmp_path / "runs"
    rep = runs / "experiment" / "report"
    rep.mkdir(parents=True)
    (rep / "table.md").write_text("### Title\n\n| Method | Acc |\n|---|---|\n| router | 61.3 |\n")
    (rep / "config.json").write_text(json.dumps({"seconds": {"traces": 12.0, "total": 99.4},
                                                 "peak_rss_mb": {"traces": 900.0,
                                                                 "online": 2100.0}}))
    (runs / "benchmarks").mkdir()
    (runs / "benchmarks" / "core.json").write_text(json.dumps({
        "name": "core", "title": "Core bench", "columns": ["a", "b"], "rows": [[1, 2.5]],
        "notes": "", "command": "python -m launch.benchmark_core", "date": "2026-11-28",
        "machine": {"cpus": 2, "jax": "0.10.2", "device": "cpu"}}))
    (runs / "benchmarks" / "router.json").write_text(json.dumps({
        "name": "router", "title": "Router bench", "columns": ["n"], "rows": [[1]], "notes": "",
        "command": "x", "date": "2026-11-28", "machine": {}, "one_problem_us": 31.25}))
    (runs / "benchmarks" / "fanout_estimate.json").write_text(json.dumps({
        "name": "fanout_estimate", "title": "Paper-scale sets", "columns": ["dataset", "h"],
        "rows": [["gsm8k", 3.5]], "notes": "", "command": "python -m launch.benchmark_fanout",
        "date": "2026-12-07", "machine": {}}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN generated results (python -m launch.results) -->\nOLD 1.0"
                      "\n<!-- END generated results -->\nmid\n<!-- BEGIN generated scaling "
                      "estimate (python -m launch.results) -->\nOLD 2.0\n<!-- END generated "
                      "scaling estimate -->\nrest\n")
    doc = tmp_path / "results.md"
    res = _run([f"--runs={runs}", f"--doc={doc}", f"--readme={readme}"])
    assert res.returncode == 0, res.stderr[-2000:]
    text = readme.read_text()
    assert "| router | 61.3 |" in text and "OLD 1.0" not in text
    assert "| gsm8k | 3.5 |" in text.split("mid\n")[1] and "OLD 2.0" not in text
    assert text.startswith("intro\n") and text.endswith("rest\n")
    assert "traces 12 s, total 99 s" in text
    body = doc.read_text()
    assert "### Core bench" in body and "| 1 | 2.5 |" in body
    assert "Not run yet: `python -m launch.benchmark_offline`" in body
    # The targets table reads each measurement from its run's output and judges it.
    assert "| 2100 MiB | ≤ 2048 MiB | missed |" in body  # the worst stage counts
    assert "| 99 s | ≤ 300 s | met |" in body
    assert "| 31.2 µs | ≤ 50 µs | met |" in body
    assert body.count("| not run | ≤ 1.2× | – |") == 2  # stepwise generation, Ray fan-out
    # Re-running on the same outputs changes nothing (the block is replaced, not appended).
    before = readme.read_text()
    assert _run([f"--runs={runs}", f"--doc={doc}", f"--readme={readme}"]).returncode == 0
    assert readme.read_text() == before


def test_a_readme_without_the_generated_block_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    res = _run([f"--runs={tmp_path}", f"--doc={tmp_path / 'r.md'}", f"--readme={readme}"])
    assert res.returncode != 0 and "no generated block" in res.stderr
