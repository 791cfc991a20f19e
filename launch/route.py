"""Online routing: live stepwise generation with a routing rule, against the per-step baselines.

    python -m launch.route                                   # embedded default, everything
    python -m launch.route --router=runs/experiment/router --rules=router,rsd --out=runs/route
    python -m launch.route --preset=qwen_math --dataset=gsm8k --data_path=../shared/data/gsm8k \\
        --router=runs/gsm8k/router --steer_traces=traces/gsm8k --out=runs/route_gsm8k

Rules: `small`, `large` (one model alone), `router` (an exported TCPO router, eq. 6), `steer`
(STEER's per-step GMMs fitted on the train split of --steer_traces, τ on the 0.1 grid), `rsd`
(a process reward model), `specreason` (a judge). Thresholded rules are grid-searched on the
calibration split (0.1 steps) and reported on the test split, with the offline table's
metrics; each problem's pieces, decisions and costs go to OUT/<rule>/paths.jsonl.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

from generation import answers, costs, datasets, features, online, scorers
from jaxroute import export, trace
from jaxroute.trace import atomic_write_text
from launch import common, presets, report

_PRESET = flags.DEFINE_enum("preset", "embedded", sorted(presets.PRESETS), "Paper setup.")
_MODELS = flags.DEFINE_list("models", None, "Backend specs small → large (overrides the preset).")
_PARAMS = flags.DEFINE_list("params", None, "N per model for FLOPs (overrides the preset).")
_PRM = flags.DEFINE_string("prm", None, "RSD reward model: tiny | vllm:MODEL[:qwen|skywork].")
_JUDGE = flags.DEFINE_string("judge", None, "SpecReason judge: tiny | vllm-large | "
                             "openai:MODEL[@BASE_URL].")
_ROUTER = flags.DEFINE_string("router", None, "Exported router folder (for the `router` rule).")
_STEER = flags.DEFINE_string("steer_traces", None, "Trace set whose train split fits STEER.")
_RULES = flags.DEFINE_list("rules", ["small", "large", "router", "steer", "rsd", "specreason"],
                           "Rules to run (those lacking their model/router are skipped).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Fixed threshold for rsd/specreason/steer "
                                "(default: grid search on the calibration split).")
_DATASET = flags.DEFINE_string("dataset", None, "gsm8k | math500 | omnimath | tiny.")
_DATA = flags.DEFINE_string("data_path", None, "Local dataset file or folder.")
_LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N problems of the dataset.")
_N = flags.DEFINE_list("problems", ["150", "250"], "tiny: problems in cal, test.")
_OUT = flags.DEFINE_string("out", "runs/route", "Output folder.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Guard: steps per solution.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Guard: generated tokens per solution.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and split seed.")


DEFAULT_TRACES = Path("runs/experiment/traces")  # the main job's trace set (embedded default)


def load_problems(dataset: str, seed: int) -> tuple[list, list]:
    """(cal, test) problems."""
    if dataset == "tiny":
        from generation.tinylm import task

        n_cal, n_test = map(int, _N.value)
        return ([p.problem for p in task.generate(n_cal, seed, "cal")],
                [p.problem for p in task.generate(n_test, seed, "test")])
    problems = datasets.load(dataset, _DATA.value, _LIMIT.value)
    split = datasets.split(problems, seed=seed)
    return ([p for p in problems if split[p.problem_id] == "cal"],
            [p for p in problems if split[p.problem_id] == "test"])


def make_scorer(spec: str, backends, cache: Path):
    """A non-embedded step scorer from a spec (see the flags; "tiny" is resolved by the caller,
    which knows whether it wants the PRM or the judge); None for an empty spec."""
    if not spec:
        return None
    if spec == "vllm-large":
        return scorers.VLLMJudge(backends[-1])
    kind, _, rest = spec.partition(":")
    if kind == "vllm":
        m = re.fullmatch(r"(.+?)(?::(qwen|skywork))?", rest)
        return scorers.VLLMRewardModel(m.group(1), prompt_format=m.group(2) or "qwen")
    if kind == "openai":
        return scorers.OpenAIJudge(common.make_backend(spec, cache=cache, seed=_SEED.value))
    raise flags.ValidationError(f"unknown scorer spec {spec!r}")


def main(argv):
    del argv
    common.quiet()
    pre = presets.get(_PRESET.value)
    models = _MODELS.value or list(pre.models)
    params = [float(p) for p in (_PARAMS.value or pre.params)]
    # --cost_model (launch.common) when given, else the preset's unit.
    cost_model = common.cost_model() if flags.FLAGS["cost_model"].present else pre.cost_model
    dataset = _DATASET.value or pre.dataset
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "api_cache.sqlite"
    mem = list(pre.gpu_memory_utilization)
    backends = [common.make_backend(s, params=params[i] if i < len(params) else None,
                                    cache=cache, seed=_SEED.value,
                                    gpu_memory_utilization=mem[min(i, len(mem) - 1)])
                for i, s in enumerate(models)]
    k = len(backends)
    prices = [getattr(b, "price", costs.Price(0, 0, 0)) for b in backends]
    infos = [trace.ModelInfo(b.name, float(b.params), p.input, p.cached_input, p.output)
             for b, p in zip(backends, prices, strict=True)]

    manifest = trace.Manifest(models=tuple(infos), feature_names=features.FEATURE_NAMES,
                              provenance={"preset": _PRESET.value, "models": models,
                                          "dataset": dataset})
    cal, test = load_problems(dataset, _SEED.value)
    tiny = dataset == "tiny"
    cfg = online.OnlineConfig(max_steps=_MAX_STEPS.value or (8 if tiny else 40),
                              max_tokens_per_step=64 if tiny else 1024,
                              max_tokens_per_solution=_MAX_TOKENS.value or (160 if tiny else 4096),
                              seed=_SEED.value)
    rows, curves = [], {}

    with answers.AnswerChecker(workers=2) as checker:
        def run(problems, rule):
            bar = tqdm(total=len(problems), desc=f"{rule.name}", unit="problem", leave=False)
            recs = online.run_online(problems, backends, rule, checker, cfg,
                                     progress=lambda n: bar.update(n - bar.n))
            bar.close()
            return recs

        def add(name, recs, row, extra=None):
            rows.append({"method": name, "external": extra or "–", **row})
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            online.write_paths(out / slug, manifest, recs)

        # Large-only first: R_M (is the large model right?) for the coverage column.
        large = online.FixedRule(f"model {k - 1} only", k - 1)
        large_recs = {s: run(ps, large) for s, ps in (("cal", cal), ("test", test))}
        large_right = {r["problem_id"]: r["correct"] for rs in large_recs.values() for r in rs}
        large_acc_cal = 100.0 * sum(r["correct"] for r in large_recs["cal"]) / max(len(cal), 1)

        def summarize(recs):
            return online.summarize_run(recs, large_right, infos, cost_model, _SEED.value)

        if "small" in _RULES.value:
            recs = run(test, online.FixedRule("model 0 only", 0))
            add("model 0 only", recs, summarize(recs))
        if "large" in _RULES.value:
            add(f"model {k - 1} only", large_recs["test"], summarize(large_recs["test"]))
        if "router" in _RULES.value and _ROUTER.value:
            router = export.load_router(_ROUTER.value, feature_names=features.FEATURE_NAMES,
                                        model_names=[b.name for b in backends])
            recs = run(test, online.RouterRule(router))
            add("TCPO router (ours, online)", recs, dict(summarize(recs), threshold=router.kappa),
                "no")

        def grid(name, make_rule, external="yes"):  # external: uses a model of its own
            if _THRESHOLD.value is not None:
                recs = run(test, make_rule(_THRESHOLD.value))
                add(name, recs, dict(summarize(recs), threshold=_THRESHOLD.value), external)
                return
            res = online.grid_search(make_rule, online.GRID, cal, test, run, large_right, infos,
                                     cost_model, large_acc_cal, _SEED.value)
            add(name, res["records"], dict(res["row"], threshold=res["threshold"]), external)
            curves[name] = res["curve"]

        steer_src = _STEER.value or (DEFAULT_TRACES if tiny and DEFAULT_TRACES.exists() else None)
        if "steer" in _RULES.value and steer_src is None:
            print("STEER skipped: give --steer_traces=TRACE_SET (its train split fits the GMMs)")
        if "steer" in _RULES.value and steer_src is not None:
            from jaxroute import baselines

            m, recs = trace.load_trace_set(steer_src)
            trees = trace.pack(m, recs, cost_model)
            steer = baselines.fit_steer(trees.subset(trees.split_indices("train")), 0, 1)
            grid("STEER", lambda tau: online.SteerRule(steer, tau, k), "no")
        prm_spec = _PRM.value if _PRM.value is not None else pre.prm
        if "rsd" in _RULES.value and prm_spec:
            if prm_spec == "tiny":
                from generation.tinylm import scorers as tiny_scorers

                prm = tiny_scorers.load_prm()
            else:
                prm = make_scorer(prm_spec, backends, cache)
            grid("RSD", lambda d: online.ScoreRule(prm, d, k, name="RSD"))
        judge_spec = _JUDGE.value if _JUDGE.value is not None else pre.judge
        if "specreason" in _RULES.value and judge_spec:
            if judge_spec == "tiny":
                from generation.tinylm import scorers as tiny_scorers

                judge = tiny_scorers.TinyJudge(backends[-1])
            else:
                judge = make_scorer(judge_spec, backends, cache)
            grid("SpecReason", lambda s: online.ScoreRule(judge, s, k, name="SpecReason"))

    unit = report.cost_unit(cost_model)
    title = f"Online routing — {dataset} test split ({len(test)} problems), preset {_PRESET.value}"
    result = {"rows": rows, "curves": curves}
    report.write_report(out / "report", result, unit, title,
                        {"preset": _PRESET.value, "models": models, "dataset": dataset,
                         "cost_model": cost_model, "config": cfg.__dict__,
                         "router": _ROUTER.value})
    print(report.markdown_table(rows, unit, title))
    atomic_write_text(out / "rows.json", json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    app.run(main)
