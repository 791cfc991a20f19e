"""Tiny LM: task, rule verifier, KV-cache decoding, the backend's sampling and raw logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generation.backends.base import StepRequest
from generation.tinylm import scorers, task, train
from generation.tinylm.backend import TinyLMBackend
from generation.tinylm.model import LMConfig, TinyLM, Tokenizer
from jaxroute import stats


def test_task_is_seeded_and_solutions_check_out():
    a, b = task.generate(50, 1, "test"), task.generate(50, 1, "test")
    assert a == b and a != task.generate(50, 1, "train")
    for p in a:
        assert len(p.solution_steps) == int(p.problem.difficulty)
        assert all(task.check_step(s) for s in p.solution_steps)
        assert p.solution_steps[-1].endswith(f"\\boxed{{{p.problem.gold}}}")
    assert task.check_step("3 + 4 = 8") is False and task.check_step("no maths") is None


@pytest.mark.slow
def test_kv_cache_decoding_equals_full_forward():
    tok = Tokenizer()
    cfg = LMConfig(vocab=tok.vocab_size, layers=2, d_model=32, heads=4, max_len=96)
    model = TinyLM(cfg)
    x = jnp.array([tok.prompt("Ada has 3 coins. Gets 4. How many?") + tok.encode("3 + 4 = 7")])
    params = model.init(jax.random.PRNGKey(0), x)
    full = model.apply(params, x)
    k = 12
    last, caches = model.apply(params, x[:, :k], jnp.array([k]), method=TinyLM.prefill)
    np.testing.assert_allclose(last, full[:, k - 1], atol=1e-4)
    for t in range(k, x.shape[1]):
        logits, caches = model.apply(params, x[:, t], caches, jnp.array([t]), method=TinyLM.decode)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-4)


def _bias_towards(weights, token: int, logit: float):
    """Weights whose logit of `token` is ≈ `logit` higher at every position. The head has no bias
    (Qwen2 layout), so every embedding gets a large shared coordinate 0 — the final RMSNorm maps
    it to ≈ √d whatever the block outputs — and the head reads that coordinate into `token`."""
    w = jax.tree.map(lambda x: x, weights)
    p = w["params"]
    d = p["embed_tokens"]["embedding"].shape[1]
    p["embed_tokens"]["embedding"] = p["embed_tokens"]["embedding"].at[:, 0].set(100.0)
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"].at[0, :].set(0.0).at[0, token].set(
        logit / np.sqrt(d))
    return w


@pytest.fixture(scope="module")
def random_backend():
    tok = Tokenizer()
    cfg = LMConfig(vocab=tok.vocab_size, layers=1, d_model=32, heads=4, max_len=128)
    params = TinyLM(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))
    return TinyLMBackend("random", cfg, params, temperature=1.0)


def test_backend_reports_true_raw_logits_and_is_seeded(random_backend):
    be = random_backend
    reqs = [StepRequest(f"k{i}", "Ada has 3 coins. How many?", (), (), seed=i) for i in range(3)]
    a = be.generate(reqs, max_tokens=20)
    b = be.generate(reqs, max_tokens=20)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].token_ids != a[1].token_ids
    r = a[0]
    prompt = be.tok.prompt(reqs[0].question)
    full = be.model.apply(be.weights, jnp.array([prompt + r.token_ids]))
    expect = np.asarray(full[0, len(prompt) - 1:len(prompt) - 1 + len(r.token_ids)]).max(-1)
    np.testing.assert_allclose(r.confidence, expect, atol=1e-4)
    assert r.confidence_kind == "max_logit" and r.completion_tokens == len(r.token_ids)
    assert be.params == sum(x.size for x in jax.tree.leaves(be.weights))


def test_backend_stops_on_the_delimiter(random_backend):
    be = random_backend
    nl = be.tok.stoi["\n"]
    # Force "\n" to be the only likely token: bias the head towards it.
    w = _bias_towards(be.weights, nl, 50.0)
    forced = TinyLMBackend("forced", be.cfg, w)
    r = forced.generate([StepRequest("k", "How many?", (), (), 0)], max_tokens=40)[0]
    assert r.token_ids == [nl, nl] and r.text == "" and r.finish_reason == "stop"
    whole = forced.generate([StepRequest("k", "How many?", (), (), 0)], whole=True,
                            max_tokens=40)[0]
    assert len(whole.token_ids) > 2  # no delimiter stop in whole mode


def _chain(be, question, seed, steps=3, max_tokens=12):
    """Generate `steps` steps one call at a time, continuing by token ids."""
    ids, out = (), []
    for t in range(steps):
        r = be.generate([StepRequest("k", question, (), ids, seed + t)], max_tokens=max_tokens)[0]
        out.append(r)
        ids = ids + tuple(r.token_ids)
    return out


def test_prefix_cache_continues_exactly_where_prefill_would(random_backend):
    cfg, w = random_backend.cfg, random_backend.weights
    cached = TinyLMBackend("c", cfg, w, temperature=1.0)
    fresh = TinyLMBackend("f", cfg, w, temperature=1.0, prefix_cache_mb=0)
    a, b = _chain(cached, "Ada has 3 coins. How many?", 7), _chain(fresh, "Ada has 3 coins. How many?", 7)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.confidence, y.confidence, atol=1e-4)
    assert [r.cached_tokens for r in a] == [0, a[1].prompt_tokens, a[2].prompt_tokens]
    assert all(r.cached_tokens == 0 for r in b)
    assert cached.stats["prefix_hits"] == 2 and fresh.stats["prefix_hits"] == 0
    assert all(len(r.token_ids) <= 12 for r in a + b)  # max_tokens is exact, not bucketed


def test_prefix_cache_holds_its_own_bytes_within_its_budget(random_backend):
    """Regression (decision 81): entries were views that kept whole batches' K/V buffers
    alive, and the cache was bounded in entries, not bytes."""
    cfg, w = random_backend.cfg, random_backend.weights
    budget = 1.2 * 2**20  # two rounds of 24 rows (32 with padding) at 64 positions
    be = TinyLMBackend("c", cfg, w, temperature=1.0, prefix_cache_mb=budget / 2**20)
    for round_ in range(3):
        reqs = [StepRequest(f"k{i}", f"Ada has {i} coins. Round {round_}?", (), (), seed=i)
                for i in range(24)]
        be.generate(reqs, max_tokens=20)
        held = list(be._held.values())
        # Every held state is counted once, is referenced by a cached row, and holds only the
        # rows of one decode round (a power of two ≤ the batch), not the whole batch.
        assert be._cache_bytes == sum(
            sum(a.nbytes for a in jax.tree.leaves(h[0])) for h in held) <= budget
        assert all(h[1] >= 1 for h in held)
        assert sum(h[1] for h in held) == len(be._cache) >= 1
        assert all(h[0][0].shape[0] <= 32 for h in held)
    assert len(be._cache) < 3 * 24  # the budget evicted the oldest


def test_prefix_cache_serves_mixed_sources_exactly(random_backend):
    """Batched chains whose rows come from several held states (compaction rounds, earlier
    calls) and from prefill in one call continue exactly as a backend without a cache."""
    nl = random_backend.tok.stoi["\n"]
    w = _bias_towards(random_backend.weights, nl, 4.0)  # ragged steps
    cached = TinyLMBackend("c", random_backend.cfg, w, temperature=1.0)
    fresh = TinyLMBackend("f", random_backend.cfg, w, temperature=1.0, prefix_cache_mb=0)
    ids = {i: () for i in range(40)}
    for t in range(3):
        # Each step also brings new problems (misses) beside continuing ones (hits).
        keys = sorted(ids)[: 20 + 10 * t]
        for i in range(40 + 5 * t, 45 + 5 * t):
            ids[i] = ()
            keys.append(i)
        reqs = [StepRequest(f"k{i}", f"Bo has {i} pens. How many?", (), ids[i], seed=7 * i + t)
                for i in keys]
        a, b = cached.generate(reqs, max_tokens=30), fresh.generate(reqs, max_tokens=30)
        for i, x, y in zip(keys, a, b, strict=True):
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(x.confidence, y.confidence, atol=1e-4)
            ids[i] = ids[i] + tuple(x.token_ids)
    assert cached.stats["prefix_hits"] > 0 and cached.stats["prefix_misses"] > 0
    assert len(cached._held) > 1  # rows came from several held states


def test_batching_and_compaction_do_not_change_a_request(random_backend):
    """40 requests in one call (the loop compacts its stragglers) == each request alone."""
    nl = random_backend.tok.stoi["\n"]
    # "\n" likely enough that steps end at random lengths (so rows finish at different times).
    w = _bias_towards(random_backend.weights, nl, 4.0)
    be = TinyLMBackend("b", random_backend.cfg, w, temperature=1.0, prefix_cache_mb=0)
    reqs = [StepRequest(f"k{i}", f"Bo has {i} pens. How many?", (), (), seed=i) for i in range(40)]
    together = be.generate(reqs, max_tokens=40)
    assert be.stats["decode_loops"] > 1  # compaction happened
    for r, t in zip(reqs, together, strict=True):
        alone = be.generate([r], max_tokens=40)[0]
        assert alone.token_ids == t.token_ids
        np.testing.assert_allclose(alone.confidence, t.confidence, atol=1e-4)
    assert len({len(t.token_ids) for t in together}) > 1


def test_a_long_prompt_does_not_shorten_its_batch_mates_budget(random_backend):
    be = TinyLMBackend("b", random_backend.cfg, random_backend.weights, temperature=1.0,
                       prefix_cache_mb=0)
    short = StepRequest("s", "Ada has 3 coins.", (), (), seed=1)
    long = StepRequest("l", "Bo has 5 pens. " * 6 + "How many?", (), (), seed=2)
    alone = be.generate([short], whole=True, max_tokens=60)[0]
    both = be.generate([short, long], whole=True, max_tokens=60)
    assert both[0].token_ids == alone.token_ids and len(alone.token_ids) > 128 - 1 - 100
    assert len(both[1].token_ids) <= be.cfg.max_len - 1 - both[1].prompt_tokens


def test_weights_checksum(tmp_path):
    tok = Tokenizer()
    cfg = LMConfig(vocab=tok.vocab_size, layers=1, d_model=16, heads=2, max_len=32)
    params = TinyLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    train.save(tmp_path, "m", cfg, params, {"steps": 0})
    cfg2, params2, _ = train.load(tmp_path, "m")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    data = bytearray((tmp_path / "m.npz").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "m.npz").write_bytes(bytes(data))
    with pytest.raises(train.ChecksumError, match="sha256"):
        train.load(tmp_path, "m")


def test_openai_backend_against_the_tiny_model_server(random_backend):
    """The OpenAI backend (chat and completions) through a real HTTP server for tiny models."""
    from generation.backends.openai_backend import OpenAIBackend
    from generation.serving.tiny_server import TinyLMServer, parse_chat, parse_completion_prompt

    with TinyLMServer({"tiny": random_backend}) as srv:
        for mode in ("chat", "completions"):
            # The server samples at the model's own temperature and refuses any other.
            be = OpenAIBackend("tiny", base_url=srv.base_url, api_key="x", mode=mode,
                               backoff_base=0.01, temperature=random_backend.temperature)
            req = StepRequest("k", "Ada has 3 coins. How many?", ("3 + 1 = 4",), None, seed=5)
            r = be.generate([req], max_tokens=16)[0]
            assert r.error is None and r.completion_tokens > 0
            assert len(r.tokens) == len(r.confidence) and all(0 < c <= 1 for c in r.confidence)
            # The server answered from the same weights: same tokens as the backend itself.
            direct = random_backend.generate([req], max_tokens=16)[0]
            assert r.text == direct.text
        raw = OpenAIBackend("tiny", base_url=srv.base_url, api_key="x", mode="completions",
                            confidence="max_logit", temperature=random_backend.temperature)
        bad = raw.generate([StepRequest("k", "What?", (), None, 1)], max_tokens=8)[0]
        assert bad.error is None
    q, steps = parse_completion_prompt("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
                                       "a\n\nb\n\n")
    assert (q, steps) == ("Q?", ("a", "b"))
    from generation.backends.openai_backend import chat_messages
    msgs = chat_messages(StepRequest("k", "Q?", ("a", "b"), None), whole=False)
    assert parse_chat(msgs) == ("Q?", ("a", "b"))


def test_auroc_equals_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[y] for b in s[~y]]
    assert stats.auroc(s, y) == pytest.approx(np.mean(pairs))
    assert np.isnan(stats.auroc(s, np.zeros(60, bool)))


def test_tiny_judge_is_the_large_models_lowest_maths_token_probability(random_backend):
    from generation.tinylm.scorers import TinyJudge
    from generation.traces import features

    be = random_backend
    judge = TinyJudge(be)
    items = [("Ada has 3 coins. How many?", ("3 + 1 = 4", "So 4 coins.")),
             ("Bo has 5 pens.", ("5 - 2 = 3",))]
    scores, spent = judge.score(items)
    for (q, steps), s, c in zip(items, scores, spent, strict=True):
        head = be.tok.prompt(q) + be.tok.encode("".join(x + "\n\n" for x in steps[:-1]))
        body = be.tok.encode(steps[-1])
        logits = np.asarray(be.model.apply(be.weights, jnp.array([head + body])))[0]
        p = np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
        probs = np.array([p[len(head) - 1 + j, t] for j, t in enumerate(body)])
        mask, _ = features.math_mask([be.tok.itos[t] for t in body])
        assert s == pytest.approx(probs[mask].min(), rel=1e-4)
        assert c["flops"] == 2 * be.params * (len(head) + len(body) + 1)


def test_prm_learns_a_step_label_and_prm_data_uses_the_rule_verifier(random_backend):
    from generation.tinylm import scorers

    be = random_backend
    data = scorers.prm_data(be, 6, seed=0, max_steps=2)
    for ids, y in data:  # labels are the rule verifier's verdict on the last step
        text = be.tok.decode(ids[ids.index(be.tok.asst) + 1:]).rstrip("\n").split("\n\n")[-1]
        assert y == float(task.check_step(text))
    # A learnable label: "the last step's result is even".
    rng = np.random.default_rng(0)
    toy = []
    for _ in range(400):
        a, b = rng.integers(1, 50, 2)
        step = f"{a} + {b} = {a + b}"
        toy.append((scorers._encode(be.tok, "Q?", (step,)), float((a + b) % 2 == 0)))
    params, _ = scorers.train_prm(be.cfg, be.weights, toy[:300], steps=150, batch=32, lr=3e-3,
                                  log=None)
    prm = scorers.TinyPRM(be.cfg, params)
    held = toy[300:]
    items = [("Q?", (be.tok.decode(ids[ids.index(be.tok.asst) + 1:]).rstrip("\n"),))
             for ids, _ in held]
    scores, spent = prm.score(items)
    acc = np.mean([(s > 0.5) == bool(y) for s, (_, y) in zip(scores, held, strict=True)])
    assert acc > 0.8 and all(c["flops"] > 0 for c in spent)


def test_stand_in_scorers_score_in_bounded_chunks_without_changing_a_score(random_backend,
                                                                          monkeypatch):
    """Regression (decision 81): one forward over every item made activation memory grow
    with the batch; scores in chunks equal each item scored alone."""
    from generation.tinylm import scorers

    be = random_backend
    items = [(f"Ada has {i} coins. How many?", (f"{i} + 1 = {i + 1}", f"So {i + 1}."))
             for i in range(11)]
    d = be.cfg.d_model
    prm = scorers.TinyPRM(be.cfg, {"params": {
        "lm": be.weights["params"],
        "score_hidden": {"kernel": jnp.eye(d), "bias": jnp.zeros(d)},
        "score_out": {"kernel": jnp.ones((d, 2)).at[:, 0].set(-1.0), "bias": jnp.zeros(2)}}})
    for scorer in (scorers.TinyJudge(be), prm):
        alone = [scorer.score([it]) for it in items]
        sizes = []
        real = scorer._score
        monkeypatch.setattr(scorer, "_score", lambda xs, real=real, sizes=sizes: (
            sizes.append(len(xs)), real(xs))[1])
        monkeypatch.setattr(scorers, "SCORE_ROWS", 4)
        scores, spent = scorer.score(items)
        assert sizes == [4, 4, 3]
        np.testing.assert_allclose(scores, [a[0][0] for a in alone], rtol=1e-5)
        assert spent == [a[1][0] for a in alone]
        monkeypatch.undo()


def test_a_hard_negative_is_the_step_with_a_wrong_result():
    """`scorers.corrupt`: the last equation's result off by 1–9 (never negative), the rest of the
    step as it was — what the PRM learns wrong steps from (decision 92)."""
    rng = np.random.default_rng(0)
    seen = set()
    for tp in task.generate(200, seed=5):
        for step in tp.solution_steps:
            bad = scorers.corrupt(step, rng)
            assert task.check_step(step) is True and task.check_step(bad) is False
            a, b = step.split("= ")[-1].split(" ")[0], bad.split("= ")[-1].split(" ")[0]
            assert int(b) >= 0 and 1 <= abs(int(a) - int(b)) <= 9
            assert bad.rsplit("= ", 1)[0] == step.rsplit("= ", 1)[0]
            seen.add(int(b) - int(a))
    assert scorers.corrupt("no equation here", rng) is None
    assert len(seen) > 10
