"""`python -m launch.generate` end to end against the loopback OpenAI-protocol server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from openai_server import FakeOpenAI

from jaxroute import trace, traceset

ROOT = Path(__file__).resolve().parents[1]


def _data(tmp_path, n=6):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+{i + 1}?",
                                        "answer": f"... #### {2 * i + 1}"}) + "\n"
                            for i in range(n)))
    return data


def test_generate_cli_writes_a_resumable_trace_set(tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "traces"
    with FakeOpenAI(api_key="test") as srv, FakeOpenAI() as judge:
        cmd = [sys.executable, "-m", "launch.generate", "--dataset=gsm8k", f"--data_path={data}",
               f"--models=openai:small@{srv.base_url},openai:large@{srv.base_url}",
               # Credentials in a URL (basic auth to a proxy) never reach the provenance.
               f"--verifier=openai:judge@{judge.base_url.replace('//', '//user:s3cret@')}",
               f"--out={out}", "--chunk=4",
               "--params=1.5e9,7e9"]
        env = dict(os.environ, OPENAI_API_KEY="test")
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert set(srv.auth_headers) == {"Bearer test"}  # OPENAI_API_KEY from the environment
        manifest, problems = traceset.load_trace_set(out)
        assert "s3cret" not in (out / "manifest.json").read_text()
        assert manifest.provenance["verifier"].startswith("openai:judge@http://127.0.0.1:")
        assert len(problems) == 6 and [m.name for m in manifest.models] == ["small", "large"]
        steps = problems[0]["roots"][0]["steps"]
        final = list(manifest.feature_names).index("is_final")
        assert len(steps) == 3 and steps[-1]["features"][final] == 1.0  # on the last only
        assert [s["features"][final] for s in steps[:-1]] == [0.0, 0.0]
        assert all(s["verifier_ok"] is True for s in steps)
        assert problems[0]["roots"][0]["correct"] is True  # "\boxed{1}" for 0+1
        n = len(srv.requests)
        # Re-running pays nothing: every problem is done (and every response is cached).
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and len(srv.requests) == n
    packed = trace.pack(manifest, problems, "usd_cents")
    assert packed.step_cost.shape[0] == 6


def _generate(tmp_path, srv, key, extra=()):
    cmd = [sys.executable, "-m", "launch.generate", "--dataset=gsm8k",
           f"--data_path={_data(tmp_path)}", f"--out={tmp_path / 'traces'}",
           f"--models=openai:small@{srv.base_url},openai:large@{srv.base_url}",
           "--params=1.5e9,7e9", "--chunk=2", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OPENAI_API_KEY=key),
                          capture_output=True, text=True, timeout=300)


def test_a_wrong_key_stops_at_once_with_a_clear_message_and_writes_no_records(tmp_path):
    with FakeOpenAI(api_key="right") as srv:
        res = _generate(tmp_path, srv, "wrong")
        assert res.returncode == 2 and srv.requests == []
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "OPENAI_API_KEY" in last and "Traceback" not in res.stderr
    trees = tmp_path / "traces" / "trees.jsonl"
    assert not trees.exists() or trees.read_text() == ""


def test_failed_requests_are_not_results_and_are_retried_on_resume(tmp_path):
    with FakeOpenAI() as srv:
        srv.faults = ["400"]  # one problem's first request fails (not retried: a 400)
        res = _generate(tmp_path, srv, "k", ["--max_error_rate=0.9"])
        assert res.returncode == 1 and "1 problems failed" in res.stderr, res.stderr[-2000:]
        assert "BadRequestError" in res.stdout
        _, done = traceset.load_trace_set(tmp_path / "traces")
        assert len(done) == 5  # the failed problem was not written
        manifest = traceset.read_manifest(tmp_path / "traces")
        assert manifest.provenance["last_run"]["failed"] == 1
        res = _generate(tmp_path, srv, "k")  # resume: only the failed problem is generated
        assert res.returncode == 0, res.stderr[-2000:]
        _, done = traceset.load_trace_set(tmp_path / "traces")
        assert len(done) == 6 and all(not trace.problem_errors(p) for p in done)


@pytest.mark.slow
def test_generate_cli_on_ray_with_api_backends_equals_one_process(tmp_path):
    """`--ray=local --num_shards=2` with OpenAI-style backends: each Ray worker builds its own
    clients (the key from the environment) and cache; the merged set is the one-process set."""
    pytest.importorskip("ray")
    data = _data(tmp_path, n=8)
    with FakeOpenAI(api_key="test") as srv:
        base = [sys.executable, "-m", "launch.generate", "--dataset=gsm8k",
                f"--data_path={data}", "--chunk=2", "--params=1.5e9,7e9",
                f"--models=openai:small@{srv.base_url},openai:large@{srv.base_url}"]
        env = dict(os.environ, OPENAI_API_KEY="test")
        for extra in ([f"--out={tmp_path / 'one'}"],
                      [f"--out={tmp_path / 'ray'}", "--ray=local", "--num_shards=2"]):
            res = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
        assert set(srv.auth_headers) == {"Bearer test"}
        # A wrong key on Ray stops every shard at once, as one clear line.
        (tmp_path / "bad").mkdir()
        res = _generate(tmp_path / "bad", srv, "wrong", ["--ray=local", "--num_shards=2"])
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and last.startswith("error:") and "OPENAI_API_KEY" in last, \
            res.stderr[-2000:]
    one, ray_set = (traceset.load_trace_set(tmp_path / d)[1] for d in ("one", "ray"))
    # Texts, tokens, labels and costs exactly; floats within the rounding tolerance.
    assert traceset.compare_records(ray_set, one)[0] == 8
    assert len(list((tmp_path / "ray" / "shards").glob("*/api_cache.sqlite"))) == 2
