"""Trace generation with scripted backends: format, semantics, resume, shards, failures, K = 3."""

import json

import numpy as np
import pytest
from fakes import ScriptedBackend

from generation.traces import answers, features, tracegen
from generation.traces.datasets import Problem
from jaxroute import trace, traceset


def problems(n):
    return [Problem(f"p{i}", f"What is {i}+{2 * i}?", str(3 * i), "gsm8k", float(i % 3 + 1))
            for i in range(n)]


def verifier(items):
    return [("(off)" not in step) for _, _, step in items]


@pytest.fixture(scope="module")
def checker():
    with answers.AnswerChecker(workers=1) as c:
        yield c


def make(checker, **kw):
    small = ScriptedBackend("small", 1e9, n_steps=3, wrong_rate=0.5, **kw)
    large = ScriptedBackend("large", 7e9, n_steps=2)
    return tracegen.TraceGenerator([small, large], checker, verifier,
                                   tracegen.GenConfig(roots=2, chunk=3)), small, large


def test_generated_trees_follow_the_format_and_semantics(checker):
    gen, small, large = make(checker)
    probs = problems(6)
    recs = gen.generate(probs, {p.problem_id: "train" for p in probs})
    manifest = gen.manifest({"test": True})
    for i, r in enumerate(recs):
        trace.validate_problem(r, manifest, f"record {i}")
    packed = trace.pack(manifest, recs)
    wrong_roots = 0
    for r in recs:
        for root in r["roots"]:
            assert len(root["steps"]) == 3
            # The erroneous step shows low confidence and a rejected verifier label.
            confs = [s["features"][0] for s in root["steps"]]
            labels = [s["verifier_ok"] for s in root["steps"]]
            err = [t for t, c in enumerate(confs) if c == 2.0]
            assert labels == [t not in err for t in range(3)]
            if not root["correct"]:
                wrong_roots += 1
                assert len(err) == 1
            else:
                assert err == []
            # Every branch is the large model regenerating from the prefix y_{<t}: it is right
            # unless the prefix already holds the error.
            for t, s in enumerate(root["steps"]):
                leaf = s["branches"]["1"]
                assert leaf["model"] == 1
                assert leaf["correct"] == (not err or t <= err[0])
                assert s["cost"]["flops"] == pytest.approx(2e9 * s["cost"]["output_tokens"])
        # R_M is the branch at step 0 of root 0 (the large model from scratch).
        assert r["solo"][1] == {"correct": r["roots"][0]["steps"][0]["branches"]["1"]["correct"],
                                "cost": r["roots"][0]["steps"][0]["branches"]["1"]["cost"]}
        assert r["solo"][0]["correct"] == r["roots"][0]["correct"]
    assert 0 < wrong_roots < 12
    assert packed.features.shape == (6, 2, 3, len(features.FEATURE_NAMES))
    step = features.FEATURE_NAMES.index("step_index")
    np.testing.assert_array_equal(packed.features[:, 0, :, step], [[0, 1, 2]] * 6)


def test_run_resumes_after_a_crash_and_shards_merge(tmp_path, checker):
    probs = problems(7)
    splits = {p.problem_id: "test" for p in probs}
    gen, small, _ = make(checker)
    # First attempt crashes in the third chunk.
    real = small.generate

    def crashing(reqs, **kw):
        if any("What is 6+" in r.question for r in reqs):
            raise RuntimeError("GPU fell off the bus")
        return real(reqs, **kw)

    small.generate = crashing
    with pytest.raises(RuntimeError, match="fell off"):
        tracegen.run(gen, probs, splits, tmp_path / "a", {"x": 1})
    _, done = traceset.load_trace_set(tmp_path / "a")
    assert [r["problem_id"] for r in done] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    small.generate = real
    small.calls = 0
    tracegen.run(gen, probs, splits, tmp_path / "a", {"x": 1})
    _, full = traceset.load_trace_set(tmp_path / "a")
    assert [r["problem_id"] for r in full] == [f"p{i}" for i in range(7)]
    assert small.calls == 3  # only p6's three steps were generated again
    # Two shards, then a merge, give the same problems.
    for s in range(2):
        tracegen.run(gen, probs, splits, tmp_path / f"s{s}", {"x": 1}, num_shards=2,
                     shard_index=s)
    merged = tracegen.merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")
    _, recs = traceset.load_trace_set(merged)
    assert sorted(r["problem_id"] for r in recs) == [f"p{i}" for i in range(7)]
    with pytest.raises(ValueError, match="duplicate problem_id"):
        tracegen.merge([tmp_path / "s0", tmp_path / "s0"], tmp_path / "m2")


def test_failures_are_recorded_per_problem(checker):
    gen, _, _ = make(checker, fail_on="What is 1+")
    probs = problems(3)
    recs = gen.generate(probs, {p.problem_id: "cal" for p in probs})
    bad = recs[1]["roots"][0]
    assert bad["status"].startswith("error: server said no") and bad["steps"] == []
    assert recs[0]["roots"][0]["status"] == "ok" and recs[2]["roots"][0]["status"] == "ok"
    # A model that never finishes is stopped by the step guard.
    small = ScriptedBackend("small", 1e9, never_final=True)
    gen = tracegen.TraceGenerator([small, ScriptedBackend("large", 7e9)], checker, None,
                                  tracegen.GenConfig(max_steps=4))
    rec = gen.generate(problems(1), {"p0": "test"})[0]
    assert rec["roots"][0]["status"] == "max_steps" and len(rec["roots"][0]["steps"]) == 4
    assert rec["roots"][0]["steps"][0]["verifier_ok"] is None


def test_three_models(checker):
    backends = [ScriptedBackend("s", 1e9, wrong_rate=0.5), ScriptedBackend("m", 3e9,
                wrong_rate=0.3), ScriptedBackend("l", 7e9, n_steps=2)]
    gen = tracegen.TraceGenerator(backends, checker, verifier, tracegen.GenConfig())
    probs = problems(4)
    recs = gen.generate(probs, {p.problem_id: "train" for p in probs})
    manifest = gen.manifest({})
    step = list(manifest.feature_names).index("step_index")
    for r in recs:
        trace.validate_problem(r, manifest, "k3")
        mid = r["roots"][0]["steps"][1]["branches"]["1"]
        assert mid["model"] == 1 and mid["steps"][0]["features"][step] == 1  # starts at step 1
        assert len(r["solo"]) == 3
    packed = trace.pack(manifest, recs)
    assert packed.num_models == 3 and (packed.branch_seg[:, 0, :3, 1] > 0).all()
    json.dumps(recs)  # records are plain JSON


def test_an_empty_step_is_asked_again_and_its_cost_joins_the_step(checker):
    gen, small, _ = make(checker, empty_first=1)
    probs = problems(3)
    recs = gen.generate(probs, {p.problem_id: "train" for p in probs})
    plain, _, _ = make(checker)
    base = plain.generate(probs, {p.problem_id: "train" for p in probs})
    for r, b in zip(recs, base, strict=True):
        for root, broot in zip(r["roots"], b["roots"], strict=True):
            assert root["status"] == "ok" and len(root["steps"]) == len(broot["steps"])
            for s, bs in zip(root["steps"], broot["steps"], strict=True):
                # The wasted try (one token at 2N FLOPs) is paid inside the step's cost.
                assert s["cost"]["output_tokens"] == bs["cost"]["output_tokens"] + 1
                assert s["cost"]["flops"] == pytest.approx(bs["cost"]["flops"] + 2e9)


def test_a_problem_with_a_failed_request_is_not_a_result(checker, tmp_path):
    small = ScriptedBackend("small", 1e9, n_steps=3)
    large = ScriptedBackend("large", 7e9, n_steps=2, fail_on="What is 1+")
    gen = tracegen.TraceGenerator([small, large], checker, verifier,
                                  tracegen.GenConfig(chunk=4))
    probs = problems(4)
    splits = {p.problem_id: "train" for p in probs}
    summary = tracegen.run(gen, probs, splits, tmp_path / "t", {})
    assert summary.failed == ["p1"] and summary.written == 3
    # One per leaf of the 3 steps, and R_M (the leaf at step 0, recorded as the solo run too).
    assert summary.reasons == {"server said no": 4}
    _, done = traceset.load_trace_set(tmp_path / "t")
    assert [p["problem_id"] for p in done] == ["p0", "p2", "p3"]
    # Accepting partial sets writes it, marked unusable: packing leaves it out.
    summary = tracegen.run(gen, probs, splits, tmp_path / "t", {}, accept_partial=True)
    m, done = traceset.load_trace_set(tmp_path / "t")
    packed = trace.pack(m, done)
    assert len(done) == 4 and list(packed.ok) == [True, True, True, False]


def test_a_trace_folder_belongs_to_one_set_of_settings(checker, tmp_path):
    gen, _, _ = make(checker)
    probs = problems(2)
    splits = {p.problem_id: "train" for p in probs}
    tracegen.run(gen, probs, splits, tmp_path / "t", {"dataset": "a", "config": {"chunk": 3}})
    # A resume may change the chunk size, not what the set is.
    tracegen.run(gen, probs, splits, tmp_path / "t", {"dataset": "a", "config": {"chunk": 9}})
    with pytest.raises(FileExistsError, match="dataset: 'a' → 'b'"):
        tracegen.run(gen, probs, splits, tmp_path / "t", {"dataset": "b", "config": {}})


def test_trees_through_a_streaming_server_are_the_in_process_trees(checker):
    """Trace generation on the live engine's path (decision 94): through an OpenAI-compatible
    server a segment is one streaming request cut into steps — one request per root and per
    leaf, not one per step — and, the tiny engine keying each token by its position, the trees
    are the ones the in-process engine writes step by step (texts, verdicts, generated
    tokens)."""
    from generation import main_job
    from generation.backends.openai_backend import OpenAIBackend
    from generation.serving.tiny_server import TinyLMServer
    from generation.tinylm import backend as tiny

    local = [tiny.load("small"), tiny.load("large")]
    probs, splits = main_job.problems_and_splits({"train": 6}, 4)
    cfg = tracegen.GenConfig(chunk=6, seed=2, **main_job.GEN_CONFIG)
    want = tracegen.TraceGenerator(local, checker, None, cfg).generate(probs, splits)
    with TinyLMServer({b.name: b for b in local}, logprobs_mode="raw_logits") as srv:
        remote = [OpenAIBackend(b.name, base_url=srv.base_url, mode="completions",
                                confidence="max_logit", temperature=b.temperature,
                                params=b.params) for b in local]
        assert all(b.streaming for b in remote)
        got = tracegen.TraceGenerator(remote, checker, None, cfg).generate(probs, splits)
    assert remote[0].stats["streams"] == remote[0].stats["requests"] == len(probs)
    steps = sum(len(r["roots"][0]["steps"]) for r in want)
    assert remote[1].stats["requests"] == steps and steps > len(probs)  # a leaf per step
    for g, w in zip(got, want, strict=True):
        assert g["solo"][0]["correct"] == w["solo"][0]["correct"]
        gs, ws = g["roots"][0]["steps"], w["roots"][0]["steps"]
        assert len(gs) == len(ws)
        for a, b in zip(gs, ws, strict=True):
            assert a["cost"]["output_tokens"] == b["cost"]["output_tokens"]
            assert a["branches"]["1"]["correct"] == b["branches"]["1"]["correct"]
            assert a["branches"]["1"]["cost"]["output_tokens"] == \
                b["branches"]["1"]["cost"]["output_tokens"]
