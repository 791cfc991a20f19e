"""`python -m launch.generate` end to end against the loopback OpenAI-protocol server."""

import json
import os
import subprocess
import sys
from pathlib import Path

from openai_server import FakeOpenAI

from jaxroute import trace

ROOT = Path(__file__).resolve().parents[1]


def test_generate_cli_writes_a_resumable_trace_set(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+{i + 1}?",
                                        "answer": f"... #### {2 * i + 1}"}) + "\n"
                            for i in range(6)))
    out = tmp_path / "traces"
    with FakeOpenAI() as srv:
        cmd = [sys.executable, "-m", "launch.generate", "--dataset=gsm8k", f"--data_path={data}",
               f"--models=openai:small@{srv.base_url},openai:large@{srv.base_url}",
               f"--verifier=openai:judge@{srv.base_url}", f"--out={out}", "--chunk=4",
               "--params=1.5e9,7e9"]
        env = dict(os.environ, OPENAI_API_KEY="test")
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        manifest, problems = trace.load_trace_set(out)
        assert len(problems) == 6 and [m.name for m in manifest.models] == ["small", "large"]
        steps = problems[0]["roots"][0]["steps"]
        assert len(steps) == 3 and steps[-1]["features"][3] == 1.0  # is_final on the last
        assert all(s["verifier_ok"] is True for s in steps)
        assert problems[0]["roots"][0]["correct"] is True  # "\boxed{1}" for 0+1
        n = len(srv.requests)
        # Re-running pays nothing: every problem is done (and every response is cached).
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and len(srv.requests) == n
    packed = trace.pack(manifest, problems, "usd_cents")
    assert packed.step_cost.shape[0] == 6
