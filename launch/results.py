"""Generate `docs/results.md` and the README's results block from run outputs (decision 64).

    python -m launch.experiment          # writes runs/experiment/report/
    python -m launch.benchmark_core      # each benchmark writes runs/benchmarks/<name>.json
    python -m launch.results             # renders them

Sources: `RUNS/experiment/report/{table.md,config.json}` (the main job) and every
`RUNS/benchmarks/*.json` (written by `save` below). A source that is missing is listed as
"not run" with its command, never filled in by hand.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from absl import flags

from generation.main_job import embedded_source
from jaxroute.durable import atomic_write_text, read_json, strict_json
from jaxroute.errors import InputError
from launch import common, presets

README_BEGIN = "<!-- BEGIN generated results (python -m launch.results) -->"
README_END = "<!-- END generated results -->"
# The README's second generated block: what paper-scale trace sets cost (decision 93).
SCALE_BEGIN = "<!-- BEGIN generated scaling estimate (python -m launch.results) -->"
SCALE_END = "<!-- END generated scaling estimate -->"
SCALE_COMMAND = "python -m launch.benchmark_fanout"
MAIN_COMMAND = "python -m launch.experiment"

# Benchmarks in the order docs/results.md shows them, with the command that writes each.
BENCHMARKS = {
    "routing": "python -m launch.benchmark_routing",
    "routing_quick": "python -m launch.benchmark_routing --quick",
    "routing_ablation": "python -m launch.benchmark_routing --ablation",
    "routing_validity": "python -m launch.benchmark_routing --validity",
    "tinylm": "python -m launch.benchmark_tinylm",
    "core": "python -m launch.benchmark_core",
    "offline": "python -m launch.benchmark_offline",
    "router": "python -m launch.benchmark_router --router=runs/experiment/router",
    "serve": "python -m launch.benchmark_serve --router=runs/experiment/router",
    "serve_vllm": ("python -m launch.benchmark_serve --router=runs/experiment_vllm/router "
                   "--upstreams=openai-completions-raw:tinylm-small@URL1/v1,"
                   "openai-completions-raw:tinylm-large@URL2/v1 --upstream_templates="
                   "runs/experiment_vllm/models/small,runs/experiment_vllm/models/large "
                   "--params=N_SMALL,N_LARGE --clients=1,8,32 (two vLLM OpenAI servers, README)"),
    "serve_latency": "python -m launch.benchmark_serve --router=runs/experiment/router",
    "serve_vllm_latency": "the serve_vllm command above",
    "fanout": "python -m launch.benchmark_fanout",
    "fanout_estimate": "python -m launch.benchmark_fanout",
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "jax": jax.__version__, "device": jax.devices()[0].platform}


# Benchmarks whose numbers do not depend on the embedded default (synthetic trees only).
SYNTHETIC = ("core", "offline")


def save(name: str, title: str, columns: list[str], rows: list[list[Any]], *,
         notes: str = "", extra: dict | None = None, runs: str | Path = "runs") -> Path:
    """Write a benchmark's table to `RUNS/benchmarks/<name>.json` (atomically), with the command
    line, the date, the machine and the embedded default it was measured on
    (`main_job.embedded_source`), for `python -m launch.results` to render."""
    path = Path(runs) / "benchmarks" / f"{name}.json"
    record = {"name": name, "title": title, "columns": columns, "rows": rows, "notes": notes,
              "command": "python -m " + " ".join([_module_of_main()] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(),
              "source": None if name in SYNTHETIC else embedded_source(),
              **(extra or {})}
    atomic_write_text(path, strict_json(record, indent=2, default=float) + "\n")
    return path


def _module_of_main() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return "–" if x != x else f"{x:.4g}"
    return str(x)


def table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


STALE = "**Stale**"


def source_line(recorded: str | None, command: str) -> str:
    """Which embedded default a section was measured on, and — when that is not the committed
    one (other weights or features, or a run from before sources were recorded) — a stale mark
    with the command that regenerates it (decision 92)."""
    now = embedded_source()
    if recorded == now:
        return f"Measured on the embedded default `{now}` (weights and features).\n\n"
    return (f"{STALE}: measured on `{recorded or 'an unrecorded embedded default'}`, not the "
            f"committed `{now}` — rerun `{command}`.\n\n")


def render_benchmark(rec: dict) -> str:
    m = rec.get("machine", {})
    head = (f"### {rec['title']}\n\n`{rec['command']}` — {rec['date']}, {m.get('cpus')} CPU "
            f"cores, jax {m.get('jax')} on {m.get('device')}\n\n")
    if rec["name"] not in SYNTHETIC:
        head += source_line(rec.get("source"), BENCHMARKS.get(rec["name"], rec["command"]))
    if rec["name"] in ("routing", "routing_quick", "routing_ablation"):
        # Runs from before decision 88 had only the marginal guarantee; later runs record it.
        head += (f"Guarantee of every calibrated cell: {rec.get('guarantee', 'marginal')} "
                 "(`guarantee.conformal_choice`, decisions 68, 88).\n\n")
    return head + table(rec["columns"], rec["rows"]) + (f"\n{rec['notes']}\n" if rec["notes"]
                                                        else "")


def main_job(runs: Path, folder: str = "experiment", command: str = MAIN_COMMAND
             ) -> str | None:
    rep = runs / folder / "report"
    if not (rep / "table.md").exists():
        return None
    md = (rep / "table.md").read_text()
    cfg = read_json((rep / "config.json").read_text()) if (rep / "config.json").exists() else {}
    secs = cfg.get("seconds", {})
    when = datetime.date.fromtimestamp((rep / "table.md").stat().st_mtime).isoformat()
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
    mem = cfg.get("peak_rss_mb", {})
    if mem:  # the performance targets: ≤ 5 minutes, ≤ 450 CPU-seconds, ≤ 2 GB
        timing += " (target ≤ 300 s)"
        if cfg.get("cpu_seconds"):
            workers = ("answer-check workers included; vLLM's engine-core processes not"
                       if cfg.get("engine") == "vllm" else "answer-check workers included")
            timing += (f"; CPU-seconds (user + system, {workers}): "
                       + ", ".join(f"{k} {v:.0f}" for k, v in cfg["cpu_seconds"].items())
                       + " (target ≤ 450); of the wall time, JAX compilation: "
                       + ", ".join(f"{k} {v:.0f} s" for k, v in
                                   cfg.get("compile_seconds", {}).items()))
        timing += ("; peak resident memory of the main process after each "
                   "stage: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items())
                   + " (target ≤ 2048 MiB)")
    md = re.sub(r"^### ", "#### ", md, flags=re.M)
    return (f"`{command}` — {when}, {os.cpu_count()} CPU cores; wall time: {timing}.\n\n"
            + source_line(cfg.get("source"), command) + md)


def _method_key(name: str) -> str:
    """A row's method without the live scorer's name (it names the engine that ran it)."""
    return re.sub(r" \(online, .*\)$", " (online)", name)


def engines_side_by_side(runs: Path) -> str | None:
    """The main job's rows on the JAX engine and on vLLM (same weights, same problems, same
    seeds; sampling draws differ between engines), method by method."""
    paths = [runs / f / "report" / "table.json" for f in ("experiment", "experiment_vllm")]
    if not all(p.exists() for p in paths):
        return None
    jax_rows, vllm_rows = ({_method_key(r["method"]): r for r in read_json(p.read_text())["rows"]}
                           for p in paths)
    rows = []
    for name, a in jax_rows.items():
        b = vllm_rows.get(name)
        if b is None:
            continue
        rows.append([name] + [_cell(r.get(k)) + (f" ± {_cell(r[k + '_sd'])}"
                                                  if k + "_sd" in r else "")
                              for k in ("accuracy", "cost", "coverage") for r in (a, b)])
    return ("Same weights, problems and seeds on both engines; each engine samples with its own "
            "random stream at temperature 0.7, so the trace trees are two samples of the same "
            "models. Rows that only replay the trees (single models, oracles) differ by that "
            "sampling; calibrated rows differ more, because κ is chosen on each engine's own "
            "calibration split: read them against each row's coverage interval in the tables "
            "above (the ± here is only the spread over training seeds). Within each engine the "
            "live rows are paired with the trees (decision 87): large-only online covers 1 "
            "and the exported router online equals its offline row on both; RSD's and "
            "SpecReason's per-step large-model requests pair only on the JAX engine (position-"
            "keyed tokens), so on vLLM their coverage is against an unpaired sample of R_M.\n\n"
            + table(["method", "Acc (JAX)", "Acc (vLLM)", "Cost (JAX)", "Cost (vLLM)",
                     "Coverage (JAX)", "Coverage (vLLM)"], rows))


def price_of_pac(runs: Path) -> str | None:
    """The main job under each guarantee, method by method: cost and test coverage with the
    marginal guarantee and with PAC, and PAC's price (its cost / the marginal one's)."""
    paths = [runs / f / "report" / "table.json" for f in ("experiment", "experiment_pac")]
    if not all(p.exists() for p in paths):
        return None
    marg, pac = ({r["method"]: r for r in read_json(p.read_text())["rows"]} for p in paths)
    g = read_json(paths[1].read_text()).get("guarantee", {})
    rows = []
    for name, a in marg.items():
        b = pac.get(name)
        if b is None or a.get("kind") in ("single model", "oracle") or "only (online)" in name:
            continue
        rows.append([name, _cell(a["cost"]), _cell(b["cost"]),
                     f"{b['cost'] / a['cost']:.3f}×" if a["cost"] else "–",
                     _cell(a["coverage"]), _cell(b["coverage"])])
    return (f"The same job, same problems and samples, with every knob calibrated for the PAC "
            f"guarantee (δ = {g.get('delta')}) instead of the marginal one; the price is PAC's "
            "generation cost over the marginal one's.\n\n"
            + table(["method", "cost (marginal)", "cost (PAC)", "PAC price",
                     "coverage (marginal)", "coverage (PAC)"], rows))


def pac_sentence(runs: Path) -> str | None:
    """One generated sentence for the README: the router's price of PAC on the main job."""
    paths = [runs / f / "report" / "table.json" for f in ("experiment", "experiment_pac")]
    if not all(p.exists() for p in paths):
        return None
    marg, pac = (read_json(p.read_text()) for p in paths)
    pick = lambda res: next((r for r in res["rows"] if r.get("kind") == "router"  # noqa: E731
                             and "mean ± sd" in r["method"]), None)
    a, b = pick(marg), pick(pac)
    if not a or not b:
        return None
    g = pac.get("guarantee", {})
    return (f"Price of PAC on the main job (`{MAIN_COMMAND} --guarantee=pac --delta="
            f"{g.get('delta')}`): the router ({a['method']}) costs {b['cost']:.3f} instead of "
            f"{a['cost']:.3f} FLOPs ×1e6 per problem ({b['cost'] / a['cost']:.3f}×), test "
            f"coverage {b['coverage']:.3f} instead of {a['coverage']:.3f}; every method's price "
            "is in `docs/results.md`.\n")


def _load(runs: Path, name: str) -> dict | None:
    path = runs / "benchmarks" / f"{name}.json"
    return read_json(path.read_text()) if path.exists() else None


def targets(runs: Path) -> str:
    """The performance targets against what the latest runs measured,
    each read from the output of the run that measured it."""
    rows = []
    cfg_path = runs / "experiment" / "report" / "config.json"
    cfg = read_json(cfg_path.read_text()) if cfg_path.exists() else {}
    mem, secs = cfg.get("peak_rss_mb", {}), cfg.get("seconds", {})

    def verdict(value, limit):
        return "–" if value is None else ("met" if value <= limit else "missed")

    peak = max(mem.values()) if mem else None
    rows.append(["main job, peak resident memory", MAIN_COMMAND,
                 "not run" if peak is None else f"{peak:.0f} MiB", "≤ 2048 MiB",
                 verdict(peak, 2048)])
    offline = _load(runs, "offline") or {}
    off_mb = offline.get("peak_rss_mb")
    rows.append(["offline evaluation of 100 000 problems, peak resident memory",
                 BENCHMARKS["offline"], "not run" if off_mb is None else f"{off_mb:.0f} MiB",
                 "≤ 2048 MiB", verdict(off_mb, 2048)])
    total = secs.get("total")
    rows.append(["main job, wall time", MAIN_COMMAND,
                 "not run" if total is None else f"{total:.0f} s", "≤ 300 s",
                 verdict(total, 300)])
    cpu = cfg.get("cpu_seconds", {}).get("total")
    rows.append(["main job, CPU-seconds (user + system)", MAIN_COMMAND,
                 "not run" if cpu is None else f"{cpu:.0f} s", "≤ 450 s", verdict(cpu, 450)])
    us = (_load(runs, "router") or {}).get("one_problem_us")
    rows.append(["router decision, one problem (Router.decide)", BENCHMARKS["router"],
                 "not run" if us is None else f"{us:.1f} µs", "≤ 50 µs", verdict(us, 50)])
    ratio = (_load(runs, "tinylm") or {}).get("stepwise_ratio")
    rows.append(["stepwise vs one-shot generation, tiny LMs", BENCHMARKS["tinylm"],
                 "not run" if ratio is None else f"{ratio:.2f}×", "≤ 1.2×", verdict(ratio, 1.2)])
    online = secs.get("online")
    rows.append(["main job, online stage wall time", MAIN_COMMAND,
                 "not run" if online is None else f"{online:.0f} s",
                 "≤ 65 s (half of 129 s, before streaming)", verdict(online, 65)])
    routed = (_load(runs, "tinylm") or {}).get("routed")
    live = None if not routed else routed["streams"] / routed["one_shot"]
    rows.append(["routing the test split live vs one-shot generation of the same answers, "
                 "tiny LMs", BENCHMARKS["tinylm"], "not run" if live is None else f"{live:.2f}×",
                 "≤ 1.1×", verdict(live, 1.1)])
    served = (_load(runs, "serve_vllm") or {}).get("ratios") or {}
    for n, r in served.items():
        p50_limit = 1.1 if n == "1" else 1.0
        rows.append([f"routed ÷ large-only in front of two vLLM servers, {n} client(s): "
                     "upstream requests per answer / p50 latency / throughput",
                     "the serve_vllm command (README)",
                     f"{r['requests_per_answer']:.2f} / {r['p50']:.2f}× / {r['throughput']:.2f}×",
                     f"≤ 2 / ≤ {p50_limit}× / " + ("–" if n == "1" else "≥ 1.0×"),
                     "met" if r["requests_per_answer"] <= 2 and r["p50"] <= p50_limit and (
                         n == "1" or r["throughput"] >= 1.0) else "missed"])
    fan = (_load(runs, "fanout") or {}).get("ray_over_single")
    rows.append(["trace generation, 2 Ray shards vs one process (wall)", BENCHMARKS["fanout"],
                 "not run" if fan is None else f"{fan:.2f}×", "≤ 1.2×", verdict(fan, 1.2)])
    return ("### Performance targets\n\n"
            + table(["quantity", "command", "measured", "target", ""], rows))


def _presets_section() -> list[str]:
    """The presets' GPU memory (computed from the presets, not measured; decision 71)."""

    lines = ["### GPU memory of the presets (computed by `launch.presets.memory_table`)", ""]
    for gb in (80, 141):
        cols, rows = presets.memory_table(gb * 1e9 / 2**30)
        lines += [f"One {gb} GB GPU ({gb * 1e9 / 2**30:.1f} GiB):", "", table(cols, rows)]
    return lines


def render(runs: Path) -> tuple[str, str]:
    """(docs/results.md, the README block)."""
    main = main_job(runs)
    out = ["# jaxroute — results", "",
           "Generated by `python -m launch.results` from the run outputs under `runs/`; do not",
           "edit by hand (decision 64). Each table names the command that produced it.", "",
           "## Main job (embedded default)", ""]
    out.append(main if main else f"Not run yet: `{MAIN_COMMAND}`.\n")
    vllm_cmd = MAIN_COMMAND + " --engine=vllm"
    out += ["## Main job on a real vLLM engine (decision 85)", "",
            main_job(runs, "experiment_vllm", vllm_cmd) or f"Not run yet: `{vllm_cmd}`.\n"]
    both = engines_side_by_side(runs)
    if both:
        out += ["### JAX engine and vLLM engine side by side", "", both]
    pac_cmd = MAIN_COMMAND + " --guarantee=pac --delta=0.1"
    out += ["## Main job with the PAC guarantee (decision 88)", "",
            main_job(runs, "experiment_pac", pac_cmd) or f"Not run yet: `{pac_cmd}`.\n"]
    price = price_of_pac(runs)
    if price:
        out += ["### The price of PAC over marginal, method by method", "", price]
    out += ["## Benchmarks", "", targets(runs)]
    out += _presets_section()
    for name, cmd in BENCHMARKS.items():
        path = runs / "benchmarks" / f"{name}.json"
        if path.exists():
            out.append(render_benchmark(read_json(path.read_text())))
        else:
            out.append(f"### {name}\n\nNot run yet: `{cmd}`.\n")
    readme = (main if main else f"Not run yet: `{MAIN_COMMAND}`.\n") + (
        "\n" + pac_sentence(runs) if pac_sentence(runs) else "")
    return "\n".join(out).rstrip() + "\n", readme


def replace_block(text: str, block: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """`text` with the generated block between the markers `begin` … `end` replaced."""
    if begin not in text or end not in text:
        raise InputError(f"README has no generated block ({begin} … {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + block.rstrip() + "\n" + end + tail


def scale_block(runs: Path) -> str:
    """The README's scaling estimate: the `fanout_estimate` table, or how to make it."""
    path = runs / "benchmarks" / "fanout_estimate.json"
    if not path.exists():
        return f"Not run yet: `{SCALE_COMMAND}`.\n"
    return render_benchmark(read_json(path.read_text()))


_RUNS = flags.DEFINE_string("runs", "runs", "Folder of run outputs.")
_DOC = flags.DEFINE_string("doc", "docs/results.md", "Results document to write.")
_README = flags.DEFINE_string("readme", "README.md", "README whose generated block to rewrite.")


def main(argv):
    del argv
    doc, block = render(Path(_RUNS.value))
    atomic_write_text(_DOC.value, doc)
    readme = Path(_README.value)
    text = replace_block(readme.read_text(), block)
    text = replace_block(text, scale_block(Path(_RUNS.value)), SCALE_BEGIN, SCALE_END)
    atomic_write_text(readme, text)
    print(f"wrote {_DOC.value} and the results block of {readme}")


if __name__ == "__main__":
    common.run(main)
