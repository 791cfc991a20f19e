"""`python -m launch.export` and `python -m launch.route` end to end (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from openai_server import FakeOpenAI

from jaxroute import export, records

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    res = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, **kw)
    return res


@pytest.mark.slow
def test_export_reexports_a_finished_run_identically(tmp_path):
    work = tmp_path / "run"
    res = _run(["launch.train", "--synthetic=80", "--iterations=5", f"--workdir={work}",
                "--alpha=0.1"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(["launch.export", f"--workdir={work}", "--synthetic=80",
                f"--out={tmp_path / 'again'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "max |Δπ|" in res.stdout
    a, b = export.load_router(work / "router"), export.load_router(tmp_path / "again")
    assert a.kappa == b.kappa and a.meta["alpha"] == b.meta["alpha"] == 0.1
    assert b.meta["models"][0]["name"] == "synthetic-model-0" and "train_config" in b.meta
    f = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    m = np.zeros(50, np.int32)
    np.testing.assert_array_equal(a.decide(f, m).model, b.decide(f, m).model)
    bad = _run(["launch.export", f"--workdir={tmp_path / 'nothing'}", "--synthetic=80"])
    assert bad.returncode != 0 and "train_config.json: not found" in bad.stderr


def test_route_cli_runs_rules_and_per_step_baselines_on_loopback(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+{i + 1}?",
                                        "answer": f"... #### {2 * i + 1}"}) + "\n"
                            for i in range(20)))
    out = tmp_path / "route"
    with FakeOpenAI() as srv:
        res = _run(["launch.route", "--dataset=gsm8k", f"--data_path={data}",
                    f"--models=openai:small@{srv.base_url},openai:large@{srv.base_url}",
                    "--params=1.5e9,7e9", f"--judge=openai:gpt-4o-mini@{srv.base_url}",
                    "--rules=small,large,specreason", "--threshold=0.5",
                    "--cost_model=usd_cents", f"--out={out}"],
                   env=dict(os.environ, OPENAI_API_KEY="test"))
    assert res.returncode == 0, res.stderr[-3000:]
    # Regression: rows.json and report/table.json held NaN/Infinity, which strict parsers refuse.
    strict = dict(parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    json.loads((out / "report" / "table.json").read_text(), **strict)
    rows = {r["method"]: r for r in json.loads((out / "rows.json").read_text(), **strict)}
    assert set(rows) == {"model 0 only", "model 1 only", "SpecReason"}
    assert rows["SpecReason"]["scorer_cost"] > 0 and rows["model 0 only"]["scorer_cost"] == 0
    assert rows["model 1 only"]["coverage"] == 1.0
    manifest, recs = records.read_paths(out / "specreason")
    assert [m.name for m in manifest.models] == ["small", "large"] and len(recs) == 6
    assert "| SpecReason |" in (out / "report" / "table.md").read_text()


def test_the_main_job_refuses_a_guarantee_its_calibration_split_cannot_meet(tmp_path):
    """Before any generation: the numbers are named (decision 88)."""
    res = _run(["launch.experiment", f"--workdir={tmp_path / 'x'}", "--problems=40,30,30",
                "--guarantee=pac", "--delta=0.1"])
    assert res.returncode != 0
    assert "has 30 problems; a PAC guarantee at α = 0.05, δ = 0.1 needs at least 45" in res.stderr
    assert not (tmp_path / "x" / "traces").exists()
