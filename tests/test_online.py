"""Online routing engine, rules, per-step baselines and their scorers (scripted backends)."""

import dataclasses
import json

import numpy as np
import pytest
from fakes import ScriptedBackend

from generation.backends import costs, streams
from generation.live import comparison, online, rules, scorers
from generation.traces import answers, features
from generation.traces.datasets import Problem
from jaxroute import baselines, evaluate, export, records, trace, traceset

PROBLEMS = [Problem(f"p{i}", f"What is {i + 3}+{2 * i + 1}?", str(3 * i + 4), "gsm8k", 1.0)
            for i in range(30)]


class Recording:
    """Wraps a backend and keeps every result it produced (independent cost accounting)."""

    def __init__(self, inner):
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.results, self.whole_calls = [], 0

    def generate(self, requests, *, whole=False, max_tokens=1024):
        self.whole_calls += whole
        out = self.inner.generate(requests, whole=whole, max_tokens=max_tokens)
        self.results.extend(out)
        return out


def _backends():
    return [Recording(ScriptedBackend("small", 1e9, n_steps=3, wrong_rate=0.3)),
            Recording(ScriptedBackend("large", 7e9, n_steps=3, wrong_rate=0.0))]


class OffScorer:
    """A perfect step checker: 0 for a step marked "(off)", 1 otherwise."""

    name = "perfect"

    def __init__(self):
        self.seen = 0

    def score(self, items):
        self.seen += len(items)
        return ([0.0 if "(off)" in steps[-1] else 1.0 for _, steps in items],
                [{"flops": 5.0, "input_tokens": 1, "output_tokens": 0} for _ in items])


@pytest.fixture(scope="module")
def checker():
    with answers.AnswerChecker(workers=1) as c:
        yield c


def _run(rule, checker, backends=None):
    backends = backends or _backends()
    recs = online.run_online(PROBLEMS, backends, rule, checker, online.OnlineConfig(max_steps=10))
    return recs, backends


def _total_flops(recs):
    return sum(p["cost"]["flops"] for r in recs for p in r["pieces"])


def test_fixed_rules_and_cost_accounting(checker):
    small, bs = _run(rules.FixedRule("small", 0), checker)
    assert _total_flops(small) == pytest.approx(sum(2e9 * r.completion_tokens
                                                    for r in bs[0].results))
    assert not bs[1].results and 0 < np.mean([r["correct"] for r in small]) < 1
    large, bl = _run(rules.FixedRule("large", 1), checker)
    assert all(r["correct"] for r in large) and bl[1].whole_calls == 1 and not bl[0].results
    assert all(len(r["pieces"]) == 1 for r in large)  # the rest of the solution in one call


def test_rsd_with_a_perfect_scorer_fixes_every_wrong_step_and_pays_for_drafts(checker):
    scorer = OffScorer()
    recs, bs = _run(rules.ScoreRule(scorer, 0.5, 2), checker)
    assert all(r["correct"] for r in recs)
    # Every generated token is paid, discarded drafts included (independent count).
    want = sum(2e9 * r.completion_tokens for r in bs[0].results) + \
        sum(2 * 7e9 * r.completion_tokens for r in bs[1].results)
    assert _total_flops(recs) == pytest.approx(want)
    dropped = [p for r in recs for p in r["pieces"] if not p["kept"]]
    assert dropped and all("(off)" in p["text"] and p["model"] == 0 for p in dropped)
    assert len(bs[1].results) == len(dropped) and bs[1].whole_calls == 0  # per step, not sticky
    assert sum(r["scorer_cost"]["flops"] for r in recs) == 5.0 * scorer.seen
    # Back to the small model after a replaced step.
    for r in recs:
        for a, b in zip(r["pieces"], r["pieces"][1:], strict=False):
            if a.get("replaces"):
                assert b["model"] == 0


def test_score_rule_threshold_extremes(checker):
    never, _ = _run(rules.ScoreRule(OffScorer(), 0.0, 2), checker)
    small, _ = _run(rules.FixedRule("small", 0), checker)
    assert [r["correct"] for r in never] == [r["correct"] for r in small]
    assert _total_flops(never) == pytest.approx(_total_flops(small))
    always, bs = _run(rules.ScoreRule(OffScorer(), 1.5, 2), checker)
    assert all(r["correct"] for r in always)
    assert all(p["model"] == 1 for r in always for p in r["pieces"] if p["kept"])


@dataclasses.dataclass
class ThresholdRouter:
    """Stands in for `export.Router`: escalate when the confidence feature is below 5."""

    def decide(self, feats, models):
        return export.Decisions(np.where(feats[:, 0] < 5.0, 1, models),
                         (feats[:, 0] < 5.0).astype(np.float32))


def test_router_rule_is_sticky_and_the_large_model_writes_the_rest(checker):
    recs, bs = _run(rules.RouterRule(ThresholdRouter()), checker)
    assert all(r["correct"] for r in recs)
    for r in recs:
        models = [p["model"] for p in r["pieces"]]
        if 1 in models:  # one discarded draft, then the large model's rest-of-solution
            assert models[-1] == 1 and models.count(1) == 1 and r["pieces"][-1].get("whole")
            assert not r["pieces"][-2]["kept"] and r["pieces"][-2]["decision"] == 1
    assert bs[1].whole_calls >= 1
    feats = [p["features"] for r in recs for p in r["pieces"] if "features" in p]
    assert all(len(f) == len(features.FEATURE_NAMES) for f in feats)  # confidence first


def test_outcome_metrics_and_files(checker, tmp_path):
    large, _ = _run(rules.FixedRule("large", 1), checker)
    right = {r["problem_id"]: r["correct"] for r in large}
    recs, _ = _run(rules.ScoreRule(OffScorer(), 0.5, 2), checker)
    models = [trace.ModelInfo("small", 1e9), trace.ModelInfo("large", 7e9)]
    row = evaluate.summarize_records(recs, right, models, "flops")
    assert row["accuracy"] == 100.0 and row["coverage"] == 1.0
    assert row["cost"] == pytest.approx(_total_flops(recs) / 1e12 / len(recs))
    assert row["scorer_cost"] == pytest.approx(np.mean([r["scorer_cost"]["flops"] for r in recs])
                                               / 1e12)
    assert 0 < row["discarded_token_share"] < 1
    assert evaluate.summarize_records(large, right, models, "flops")["escalation_rate"] == 1.0
    assert evaluate.records_outcome(recs, right, models, "flops").escalation.tolist() == [
        next((i for i, p in enumerate(r["pieces"]) if not p["kept"]), -1) for r in recs]
    m = trace.Manifest(models=tuple(models), feature_names=("a", "b", "c", "d", "e"))
    records.write_paths(tmp_path / "run", m, recs)
    m2, back = records.read_paths(tmp_path / "run")
    assert back == recs and m2 == m
    lines = (tmp_path / "run" / records.PATHS).read_text().splitlines()
    lines[3] = lines[3].replace('"model": 0', '"model": 7', 1)
    (tmp_path / "run" / records.PATHS).write_text("\n".join(lines) + "\n")
    with pytest.raises(trace.TraceFormatError, match=r"paths.jsonl:4.pieces\[\d+\]: field 'model'"):
        records.read_paths(tmp_path / "run")


def test_live_comparison_selects_on_cal_and_reports_test(checker):
    models = [trace.ModelInfo("small", 1e9), trace.ModelInfo("large", 7e9)]
    cal, test = PROBLEMS[:12], PROBLEMS[12:]
    done = []
    res = comparison.compare_live(
        [comparison.LiveMethod("small", rules.FixedRule("small", 0), external="–"),
         comparison.LiveMethod("RSD", family=lambda d: rules.ScoreRule(OffScorer(), d, 2),
                               grid=tuple(reversed(baselines.GRID)), external="yes")],
        cal, test, _backends(), checker, online.OnlineConfig(), models, "flops", alpha=0.1,
        between=lambda: done.append(len(done)))
    assert done == [0, 1]  # the memory hook runs after each method
    rows = {r["method"]: r for r in res.rows}
    # R_M came from a large-only run on cal + test (its own row, first).
    assert res.rows[0]["method"] == "model 1 only" and set(res.large_right) == {
        p.problem_id for p in cal + test}
    # Threshold 0 never escalates (small-only accuracy); every threshold in (0, 1] fixes exactly
    # the wrong steps (a perfect scorer), so the conformal rule on cal (α = 0.1: no miss among
    # 12 problems) walks down the grid to the cheapest point that still covers: 0.1.
    assert rows["RSD"]["threshold"] == 0.1 and rows["RSD"]["accuracy"] == 100.0
    assert [c["threshold"] for c in res.curves["RSD"]] == list(reversed(baselines.GRID))
    assert res.curves["RSD"][-1]["accuracy"] == rows["small"]["accuracy"] < 100.0
    assert len(res.records["RSD"]) == len(test)
    with pytest.raises(ValueError, match="exactly one of rule= and family="):
        comparison.LiveMethod("bad")


def test_bad_rule_answer_is_refused(checker):
    class Answers:
        sticky = False

        def __init__(self, model, start):
            self.name, self.model, self.start_model = "bad", model, start

        def decide(self, views):
            return [rules.Decision(self.model) for _ in views]

    with pytest.raises(ValueError, match="answered model 5 for a step of model 0"):
        _run(Answers(5, 0), checker)
    with pytest.raises(ValueError, match="answered model 0 for a step of model 1"):
        _run(Answers(0, 1), checker)  # never back to a smaller model


def test_expected_digit_and_openai_judge_on_loopback():
    from openai_server import FakeOpenAI

    from generation.backends.openai_backend import OpenAIBackend

    assert scorers.expected_digit([{"token": "7", "logprob": 0.0}]) == 7.0
    assert scorers.expected_digit([{"token": "x", "logprob": 0.0}]) == 0.0
    two = [{"token": "2", "logprob": np.log(0.25)}, {"token": " 6", "logprob": np.log(0.75)},
           {"token": "no", "logprob": np.log(0.5)}]
    assert scorers.expected_digit(two) == pytest.approx(0.25 * 2 + 0.75 * 6)
    with FakeOpenAI() as srv:
        be = OpenAIBackend("gpt-4.1-mini", base_url=srv.base_url, api_key="x")
        judge = scorers.OpenAIJudge(be)
        s, c = judge.score([("What is 1+2?", ("Step 1: fine.",)),
                            ("What is 1+2?", ("Step 1: fine.", "Step 2: wrong."))])
        assert s[0] > 0.7 > 0.3 > s[1]
        assert c[0]["input_tokens"] == 40 and c[0]["usd"] == pytest.approx(
            costs.usd(40, 0, 1, costs.DEFAULT_PRICES["gpt-4.1-mini"]))
        body = srv.requests[-1]
        assert body["max_completion_tokens"] == 1 and body["top_logprobs"] == 10
        assert body["messages"][-1]["content"] == scorers.JUDGE_INSTRUCTION


def test_vllm_reward_model_and_judge_through_fakes():
    import fake_vllm

    from generation.backends.vllm_backend import VLLMBackend

    llm = fake_vllm.LLM(model="Qwen/Qwen2.5-Math-PRM-7B", runner="pooling",
                        trust_remote_code=True)
    prm = scorers.VLLMRewardModel("Qwen/Qwen2.5-Math-PRM-7B", params=7e9, llm=llm,
                                  vllm_module=fake_vllm.module())
    s, c = prm.score([("Q?", ("a", "b")), ("Q?", ("a", "this is wrong"))])
    assert s == [pytest.approx(0.8), pytest.approx(0.1)]
    assert c[0]["flops"] == 2 * 7e9 * len(prm.prompt("Q?", ("a", "b")))
    assert prm.prompt("Q", ("x", "y")).count("<extra_0>") == 2
    be = VLLMBackend("m", params=1e9, vllm_module=fake_vllm.module())
    judge = scorers.VLLMJudge(be)
    s, c = judge.score([("What is 2+3?", ("Step 1: think.",))])
    assert 0.0 <= s[0] <= 1.0 and c[0]["output_tokens"] == 1
    sp = be.llm.calls[-1][1][0]
    assert sp.max_tokens == 1 and sp.temperature == 0.0 and sp.logprobs == 5


@pytest.mark.parametrize("empties, status", [(2, "ok"), (3, "empty_step")])
def test_an_empty_draft_is_asked_again_with_a_new_seed_and_paid_for(checker, empties, status):
    small = Recording(ScriptedBackend("small", 1e9, n_steps=3, empty_first=empties))
    large = Recording(ScriptedBackend("large", 7e9, n_steps=3))
    recs = online.run_online(PROBLEMS[:4], [small, large], rules.FixedRule("small", 0), checker,
                             online.OnlineConfig(max_steps=10))
    for r in recs:
        wasted = [p for p in r["pieces"] if p.get("empty")]
        kept = [p for p in r["pieces"] if p["kept"]]
        assert all(not p["kept"] for p in wasted) and r["status"] == status
        if status == "ok":  # every step needed `empties` tries before it came
            assert len(wasted) == empties * len(kept) and r["correct"]
        else:  # the first step stayed empty: asked EMPTY_RETRIES more times, then given up
            assert len(wasted) == streams.EMPTY_RETRIES + 1 and not kept
    # Every generated token is paid, the empty tries included (independent count).
    assert _total_flops(recs) == pytest.approx(sum(2e9 * x.completion_tokens
                                                   for x in small.results))


def test_grid_points_share_their_work_without_changing_any_result(checker):
    models = [trace.ModelInfo("small", 1e9), trace.ModelInfo("large", 7e9)]
    cal, test = PROBLEMS[:10], PROBLEMS[10:20]
    large, _ = _run(rules.FixedRule("large", 1), checker)
    right = {r["problem_id"]: r["correct"] for r in large}
    backends = _backends()
    scorer = OffScorer()
    res = comparison.compare_live(
        [comparison.LiveMethod("RSD", family=lambda d: rules.ScoreRule(
            comparison.SharedScorer(scorer), d, 2), grid=(1.0, 0.5, 0.0), external="yes")],
        cal, test, backends, checker, online.OnlineConfig(), models, "flops", alpha=0.2,
        large_right=right)
    unshared = 0
    for g, point in zip((1.0, 0.5, 0.0), res.curves["RSD"], strict=True):
        for split in (cal, test):
            fresh = _backends()
            alone = online.run_online(split, fresh, rules.ScoreRule(OffScorer(), g, 2),
                                      checker, online.OnlineConfig())
            unshared += len(fresh[0].results)
        want = evaluate.summarize_records(alone, right, models, "flops")  # the test split
        assert point["cost"] == pytest.approx(want["cost"]) and point["accuracy"] == want[
            "accuracy"]
    # Shared: each distinct small-model draft was generated once for the whole grid.
    assert len(backends[0].results) * 2 < unshared


class Failing(Recording):
    """A backend whose requests for some problems fail (after its retries)."""

    def __init__(self, inner, fail: set[str]):
        super().__init__(inner)
        self.fail = fail

    def generate(self, requests, *, whole=False, max_tokens=1024):
        out = super().generate(requests, whole=whole, max_tokens=max_tokens)
        return [dataclasses.replace(r, error="HTTP 500") if q.key.split("/")[0] in self.fail
                else r for q, r in zip(requests, out, strict=True)]


def test_failed_requests_are_left_out_of_every_summary_and_counted(checker):
    """Regression: a failed request was scored as a wrong answer (decision 72)."""
    models = [trace.ModelInfo("small", 1e9), trace.ModelInfo("large", 7e9)]
    cal, test = PROBLEMS[:12], PROBLEMS[12:24]
    bad_small, bad_large = {"p13", "p2"}, {"p15", "p4"}
    backends = [Failing(ScriptedBackend("small", 1e9, n_steps=3, wrong_rate=0.3), bad_small),
                Failing(ScriptedBackend("large", 7e9, n_steps=3, wrong_rate=0.0), bad_large)]
    res = comparison.compare_live(
        [comparison.LiveMethod("small", rules.FixedRule("small", 0), external="–"),
         comparison.LiveMethod("RSD", family=lambda d: rules.ScoreRule(OffScorer(), d, 2),
                               grid=(1.0, 0.5, 0.0), external="yes")],
        cal, test, backends, checker, online.OnlineConfig(), models, "flops", alpha=0.1)
    assert set(res.large_right) == {p.problem_id for p in cal + test} - bad_large
    rows = {r["method"]: r for r in res.rows}
    assert rows["model 1 only"]["failed"] == 1  # p15 (test)
    assert rows["small"]["failed"] == 2  # p13 failed itself; p15 has no R_M
    # The large model never errs, so every usable large-only answer is right: 100 %.
    assert rows["model 1 only"]["accuracy"] == 100.0
    recs = res.records["small"]
    assert all(r["status"].startswith("error") for r in recs if r["problem_id"] == "p13")
    assert not records.usable(next(r for r in recs if r["problem_id"] == "p13"))
    assert records.usable({"status": "ok", "verdict": "incorrect"})
    assert not records.usable({"status": "ok", "verdict": "timeout"})


class RaisingBackend(ScriptedBackend):
    """An in-process backend that raises for a whole batch when one request is bad (as a
    batched tiny-LM call does for a character outside its alphabet)."""

    def generate(self, requests, *, whole=False, max_tokens=1024):
        bad = [r.question for r in requests if "poison" in r.question]
        if bad:
            raise ValueError(f"cannot encode {bad[0]!r}")
        return super().generate(requests, whole=whole, max_tokens=max_tokens)


def test_a_request_a_backend_refuses_fails_alone(checker):
    """Regression (decision 83): one bad request made the batched call raise, and the failing
    round failed every problem in it, each quoting the bad one's text."""
    problems = PROBLEMS + [Problem("bad", "What is 2+poison?", "4", "toy")]
    backends = [RaisingBackend("small", 1e9, n_steps=2), RaisingBackend("large", 7e9, n_steps=2)]
    recs = online.run_online(problems, backends, rules.FixedRule("small only", 0), checker,
                             online.OnlineConfig(max_steps=10))
    by_id = {r["problem_id"]: r for r in recs}
    assert by_id["bad"]["status"].startswith("error") and "poison" in by_id["bad"]["status"]
    for p in PROBLEMS:
        assert by_id[p.problem_id]["status"] == "ok" and "poison" not in json.dumps(
            by_id[p.problem_id])


# -- coupled samples on the real JAX engine (decision 87) -------------------------------------------


@pytest.fixture(scope="module")
def coupled(checker, tmp_path_factory):
    """Trace trees of 16 test problems from the two committed tiny LMs, and what live routing
    needs to replay them."""
    import jax

    from generation import main_job
    from generation.tinylm import backend as tiny
    from jaxroute import networks as nets_lib

    problems, splits = main_job.problems_and_splits({"test": 16}, 3)
    backends = [tiny.load("small"), tiny.load("large")]
    out = tmp_path_factory.mktemp("coupled")
    main_job.make_trace_set(backends, problems, splits, out / "traces", 3, checker)
    manifest, recs = traceset.load_trace_set(out / "traces")
    trees = trace.pack(manifest, recs, "mflops")
    # A router that escalates on some steps and not others: a random policy with weights
    # large enough to be decisive, κ at the median escalation probability of the trees' nodes.
    nets = nets_lib.make_networks(2, len(manifest.feature_names), (8,))
    params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(1))
    params = jax.tree.map(lambda a: a * 4.0, params)
    feats = np.asarray(trees.features).reshape(-1, trees.features.shape[-1])
    norm = nets_lib.Normalizer(feats.mean(0), feats.std(0) + 1e-3)
    probs = np.exp(np.asarray(nets.log_probs(params, norm, feats, np.zeros(len(feats), int))))
    path = export.export_router(out / "router", nets, params, norm,
                                float(np.median(probs[:, 1])),
                                feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models], alpha=0.05,
                                hidden=(8,))
    cfg = online.OnlineConfig(seed=3, **main_job.GEN_CONFIG)
    return dict(problems=problems, backends=backends, manifest=manifest, recs=recs,
                trees=trees, router=export.load_router(path), cfg=cfg)


def test_large_only_live_is_the_trees_large_only_sample(coupled, checker):
    c = coupled
    recs = online.run_online(c["problems"], c["backends"], rules.FixedRule("large", 1), checker,
                             c["cfg"])
    tree = {r["problem_id"]: r for r in c["recs"]}
    for r in recs:
        solo = tree[r["problem_id"]]["solo"][-1]
        assert r["correct"] == solo["correct"]
        assert r["pieces"][0]["cost"]["output_tokens"] == solo["cost"]["output_tokens"]
    right = {p: t["solo"][-1]["correct"] for p, t in tree.items()}
    row = evaluate.summarize_records(recs, right, c["manifest"].models, "mflops")
    assert row["coverage"] == 1.0


def test_the_router_live_writes_and_pays_what_its_replay_on_the_trees_says(coupled, checker):
    c = coupled
    recs = online.run_online(c["problems"], c["backends"], rules.RouterRule(c["router"]),
                             checker, c["cfg"])
    esc = [any(p.get("decision", 0) == 1 for p in r["pieces"]) for r in recs]
    assert 0 < sum(esc) < len(esc)  # the check covers both escalated and small-only paths
    agree = comparison.replay_agreement(recs, c["recs"], c["trees"], c["router"],
                                        c["manifest"].models, "mflops")
    print(f"offline replay vs live: {agree['identical']}/{agree['problems']} problems identical",
          agree["disagreements"])
    assert agree["problems"] == len(c["problems"])
    assert agree["rate"] >= 0.98
    # The checker itself sees a difference: another κ replayed against these records disagrees.
    other = dataclasses.replace(c["router"], kappa=1.0)  # never escalates
    assert comparison.replay_agreement(recs, c["recs"], c["trees"], other, c["manifest"].models,
                                       "mflops")["identical"] < len(recs) - sum(esc) // 2


def test_a_per_step_rule_that_rejects_every_draft_is_large_only(coupled, checker):
    c = coupled
    always = rules.ScoreRule(OffScorer(), 2.0, 2, name="reject all")  # every score < 2
    recs = online.run_online(c["problems"], c["backends"], always, checker, c["cfg"])
    tree = {r["problem_id"]: r for r in c["recs"]}
    same = sum(r["correct"] == tree[r["problem_id"]]["solo"][-1]["correct"] for r in recs)
    # The large model writing step by step draws the tokens it draws writing the rest at once
    # (each token keyed by its position), so the answers coincide.
    assert same == len(recs)
    for r in recs:
        kept = [p for p in r["pieces"] if p.get("kept")]
        assert kept and all(p["model"] == 1 for p in kept)


class Refusing:
    """A backend that must not be called (a resumed comparison has nothing left to run)."""

    def __init__(self, name, params):
        self.name, self.params = name, params

    def generate(self, requests, *, whole=False, max_tokens=1024):
        raise AssertionError(f"{self.name} was asked for {len(requests)} requests")


def test_a_live_comparison_resumes_from_its_finished_runs(checker, tmp_path):
    models = [trace.ModelInfo("small", 1e9), trace.ModelInfo("large", 7e9)]
    cal, test = PROBLEMS[:8], PROBLEMS[8:16]
    right = {p.problem_id: True for p in PROBLEMS}
    methods = [comparison.LiveMethod("small", rules.FixedRule("small", 0)),
               comparison.LiveMethod("RSD", family=lambda d: rules.ScoreRule(OffScorer(), d, 2),
                                     grid=(1.0, 0.0), external="yes")]
    kw = dict(alpha=0.2, large_right=right, store=tmp_path / "runs", fingerprint={"v": 1})
    first = comparison.compare_live(methods, cal, test, _backends(), checker,
                                    online.OnlineConfig(), models, "flops", **kw)
    refusing = [Refusing("small", 1e9), Refusing("large", 7e9)]
    again = comparison.compare_live(methods, cal, test, refusing, checker,
                                    online.OnlineConfig(), models, "flops", **kw)
    assert json.dumps(again.rows, default=str) == json.dumps(first.rows, default=str)
    assert json.dumps(again.curves, default=str) == json.dumps(first.curves, default=str)
    # Anything the runs depend on changes: they are run again, not reused.
    with pytest.raises(AssertionError, match="was asked"):
        comparison.compare_live(methods, cal, test, refusing, checker, online.OnlineConfig(),
                                models, "flops", **{**kw, "fingerprint": {"v": 2}})
