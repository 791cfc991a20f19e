"""Online routing: live stepwise generation with a routing rule, against the per-step baselines.

    python -m launch.route                                   # embedded default, everything
    python -m launch.route --router=runs/experiment/router --rules=router,rsd --out=runs/route
    python -m launch.route --preset=qwen_math --dataset=gsm8k --data_path=../shared/data/gsm8k \\
        --router=runs/gsm8k/router --steer_traces=traces/gsm8k --out=runs/route_gsm8k

Rules: `small`, `large` (one model alone), `router` (an exported router, eq. 6), `steer`
(STEER's per-step GMMs fitted on the train split of --steer_traces, τ on the 0.1 grid), `rsd`
(a process reward model), `specreason` (a judge). Thresholded rules are grid-searched on the
calibration split (0.1 steps) and reported on the test split, with the offline table's
metrics (`generation.live.comparison.compare_live`); each problem's pieces, decisions and costs go to
OUT/<rule>/paths.jsonl.
"""

from __future__ import annotations

import re
from pathlib import Path

from absl import flags

from generation import main_job
from generation.backends.base import redact_spec
from generation.backends.costs import model_infos
from generation.live import comparison, online, rules, scorers
from generation.registry import make_backend
from generation.traces import answers, datasets, features
from jaxroute import baselines, export, records, trace, traceset
from jaxroute.durable import atomic_write_text, strict_json
from launch import common, presets, report

_PRESET = flags.DEFINE_enum("preset", "embedded", sorted(presets.PRESETS), "Paper setup.")
_MODELS = flags.DEFINE_list("models", None, "Backend specs small → large (overrides the preset).")
_PARAMS = flags.DEFINE_list("params", None, "N per model for FLOPs (overrides the preset).")
_PRM = flags.DEFINE_string("prm", None, "RSD reward model: tiny | vllm:MODEL[:qwen|skywork].")
_JUDGE = flags.DEFINE_string("judge", None, "SpecReason judge: tiny | vllm-large | "
                             "openai:MODEL[@BASE_URL].")
_ROUTER = flags.DEFINE_string("router", None, "Exported router folder (for the `router` rule).")
_STEER = flags.DEFINE_string("steer_traces", None, "Trace set whose train split fits STEER "
                             "(embedded default: runs/experiment/traces when it exists).")
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
_API_KEY = flags.DEFINE_string("api_key", None, "Key for OpenAI-style backends and judges "
                               "(default: the OPENAI_API_KEY environment variable).")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Guarantee every thresholded rule is calibrated "
                            "to (coverage ≥ 1 − α on the calibration split).")

_DELTA = common.define_guarantee_flags()

DEFAULT_TRACES = Path("runs/experiment/traces")  # the main job's trace set (embedded default)
common.check_flags(alpha=(common.probability, "in (0, 1)"), limit=(common.positive, "≥ 1"),
                   max_steps=(common.positive, "≥ 1"), max_tokens=(common.positive, "≥ 1"),
                   threshold=(lambda v: 0 <= v <= 1.5, "in [0, 1.5]"),
                   problems=(lambda v: len(v) == 2 and all(x.isdigit() and int(x) > 0
                                                           for x in v),
                             "two positive counts (cal, test)"))


def methods(backends, pre, cache: Path) -> list[comparison.LiveMethod]:
    """The rows the flags ask for, small-only first."""
    k, wanted, out = len(backends), set(_RULES.value), []

    def family(name, make, external):
        grid = [_THRESHOLD.value] if _THRESHOLD.value is not None else tuple(
            reversed(baselines.SCORE_GRID))
        return comparison.LiveMethod(name, family=make, grid=grid, external=external)

    if "small" in wanted:
        out.append(comparison.LiveMethod("model 0 only", rules.FixedRule("model 0 only", 0),
                                         external="–"))
    if "router" in wanted and _ROUTER.value:
        router = export.load_router(_ROUTER.value, model_names=[b.name for b in backends])
        features.check_known(router.meta["feature_names"], _ROUTER.value)
        name = f"{router.label} (online)"
        out.append(comparison.LiveMethod(name, rules.RouterRule(router, name=name),
                                         threshold=router.kappa))
    steer_src = _STEER.value or (DEFAULT_TRACES if DEFAULT_TRACES.exists() and
                                 pre.dataset == "tiny" else None)
    if "steer" in wanted and steer_src is None:
        print("STEER skipped: give --steer_traces=TRACE_SET (its train split fits the GMMs)")
    elif "steer" in wanted:
        m, recs = traceset.load_trace_set(steer_src)
        steer = baselines.fit_steer_on_train(trace.pack(m, recs, "flops"), m.feature_names)
        out.append(family("STEER", lambda tau: rules.SteerRule(
            steer, tau, k, feature_names=tuple(m.feature_names)), "no"))
    for rule, role, spec in (("rsd", "prm", _PRM.value if _PRM.value is not None else pre.prm),
                             ("specreason", "judge",
                              _JUDGE.value if _JUDGE.value is not None else pre.judge)):
        scorer = scorers.from_spec(spec, backends, role=role, cache=cache, seed=_SEED.value,
                                   prm_engine={"gpu_memory_utilization": pre.prm_memory,
                                               "max_model_len": pre.max_model_len,
                                               "dtype": pre.dtype}) \
            if rule in wanted else None
        if scorer is not None:
            scorer = comparison.SharedScorer(scorer)  # its grid points share the scores
            name = "RSD" if rule == "rsd" else "SpecReason"
            out.append(family(name, lambda t, s=scorer, n=name: rules.ScoreRule(s, t, k, name=n),
                              "yes"))
    return out


def main(argv):
    del argv
    pre = presets.get(_PRESET.value).merged(models=_MODELS.value, params=_PARAMS.value,
                                            dataset=_DATASET.value)
    cost_model = common.cost_model() if flags.FLAGS["cost_model"].present else pre.cost_model
    out = Path(_OUT.value)
    cache = out / "api_cache.sqlite"
    backends = [make_backend(s, params=pre.param(i), cache=cache, seed=_SEED.value,
                             gpu_memory_utilization=pre.memory(i),
                             max_model_len=pre.max_model_len, api_key=_API_KEY.value,
                             dtype=pre.dtype, block_size=pre.block_size)
                for i, s in enumerate(pre.models)]
    infos = model_infos(backends)
    manifest = trace.Manifest(models=infos, feature_names=features.FEATURE_NAMES,
                              provenance={"preset": _PRESET.value,
                                          "models": [redact_spec(m) for m in pre.models],
                                          "dataset": pre.dataset})
    tiny = pre.dataset == "tiny"
    cal, test = (main_job.cal_and_test(tuple(int(n) for n in _N.value), _SEED.value) if tiny
                 else datasets.cal_and_test(pre.dataset, _DATA.value, _LIMIT.value, _SEED.value))
    cfg = online.OnlineConfig(max_steps=_MAX_STEPS.value or (8 if tiny else 40),
                              max_tokens_per_step=64 if tiny else pre.max_tokens_per_step,
                              max_tokens_per_solution=_MAX_TOKENS.value or (160 if tiny else 4096),
                              seed=_SEED.value)
    with answers.AnswerChecker(workers=2) as checker:
        res = comparison.compare_live(methods(backends, pre, cache), cal, test, backends, checker,
                                      cfg, infos, cost_model, alpha=_ALPHA.value,
                                      delta=_DELTA(), seed=_SEED.value,
                                      large_name=f"model {len(backends) - 1} only")
    requests = [b.summary() for b in backends if hasattr(b, "summary")]
    manifest = trace.Manifest(models=manifest.models, feature_names=manifest.feature_names,
                              provenance={**manifest.provenance, "requests": requests})
    for b in requests:
        print(f"{b['model']}: {b['requests']} requests, {b['cache_hits']} from cache, "
              f"{b['retries']} retries, {b['failures']} failed {b['failure_reasons'] or ''}")
    if "large" not in _RULES.value:
        res.rows = [r for r in res.rows if r["method"] != f"model {len(backends) - 1} only"]
    for name, recs in res.records.items():
        records.write_paths(out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"), manifest,
                            recs)
    unit = report.cost_unit(cost_model)
    title = f"Online routing — {pre.dataset} test split ({len(test)} problems), preset {_PRESET.value}"
    result = {"rows": res.rows, "curves": res.curves}
    report.write_report(out / "report", result, unit, title,
                        {"preset": _PRESET.value, "models": list(pre.models),
                         "dataset": pre.dataset, "cost_model": cost_model,
                         "config": cfg.__dict__, "router": _ROUTER.value})
    print(report.markdown_table(res.rows, unit, title))
    atomic_write_text(out / "rows.json", strict_json(res.rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    common.run(main)
