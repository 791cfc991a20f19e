"""Report writing for launch scripts: the paper-style table (markdown + JSON) and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxroute.durable import atomic_write_text


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_g(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


UNITS = {"flops": "FLOPs ×1e12", "mflops": "FLOPs ×1e6", "usd_cents": "US cents"}


def cost_unit(cost_model: str) -> str:
    return UNITS[cost_model]


def markdown_table(rows: list[dict[str, Any]], cost_unit: str, title: str) -> str:
    """Rows in the layout of the paper's Table 1 (plus coverage and escalation columns, and the
    per-step baselines' own scoring compute — PRM / judge — as a separate column)."""
    lines = [f"### {title}", "",
             f"| Method | Ext. models | Acc ↑ | Cost ({cost_unit}) ↓ | A/C ↑ | Scorer cost "
             "| Coverage [95% CI] | Esc. rate | Mean esc. step | Threshold |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["coverage_ci"]
        lines.append(
            f"| {r['method']} | {r['external']} | {_fmt(r['accuracy'], 1)} | {_fmt(r['cost'], 3)} "
            f"| {_fmt(r['acc_per_cost'], 2)} | {_fmt(r.get('scorer_cost'), 3)} "
            f"| {r['coverage']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {_fmt(r['escalation_rate'], 2)} | {_fmt(r['mean_escalation_step'], 2)} "
            f"| {_fmt_g(r.get('threshold', float('nan')))} |")
    return "\n".join(lines) + "\n"


def matched_line(result: dict[str, Any], cost_unit: str) -> str:
    """"At the router's accuracy, X needs …" (costs on each method's lower hull)."""
    m = result.get("matched") or {}
    if not m.get("costs"):
        return ""
    parts = [f"{name} {_fmt(c, 3)}" for name, c in m["costs"].items()]
    return (f"\nAt the accuracy of {m['reference']} ({m['accuracy']:.1f} %, cost "
            f"{m['cost']:.3f} {cost_unit}), the other methods' test curves need: "
            + ", ".join(parts) + " (lower convex hull; – where out of reach).\n")


def write_report(out: Path, result: dict[str, Any], cost_unit: str, title: str,
                 config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_table(result["rows"], cost_unit, title) + matched_line(result, cost_unit)
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.json", json.dumps(result, indent=2, default=float) + "\n")
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    plot(out / "accuracy_cost.png", result, cost_unit, title)


def plot(path: Path, result: dict[str, Any], cost_unit: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, curve in result["curves"].items():
        pts = sorted((p["cost"], p["accuracy"]) for p in curve)
        ax.plot([c for c, _ in pts], [a for _, a in pts], marker=".", lw=1, label=f"{name} (sweep)")
    markers = {"oracle": "*", "–": "s"}
    for r in result["rows"]:
        ax.scatter([r["cost"]], [r["accuracy"]], marker=markers.get(r["external"], "o"), s=60,
                   zorder=3, edgecolor="black", linewidth=0.5, label=r["method"])
    ax.set_xlabel(f"mean cost per problem ({cost_unit})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
