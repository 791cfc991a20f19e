"""Report writing for launch scripts: the paper-style table (markdown + JSON) and the plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxroute import evaluate, references
from jaxroute.durable import atomic_write_text, strict_json
from jaxroute.guarantee import describe_guarantee


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_g(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


UNITS = {"flops": "FLOPs ×1e12", "mflops": "FLOPs ×1e6", "usd_cents": "US cents"}


def cost_unit(cost_model: str) -> str:
    return UNITS[cost_model]


def _knob(r: dict[str, Any]) -> str:
    """The calibrated knob; for a live family, whether its calibration was feasible (else the
    safest grid point was used)."""
    knob = _fmt_g(r.get("threshold", float("nan")))
    if "calibration_feasible" not in r:
        return knob
    return knob + (" (feasible)" if r["calibration_feasible"] else " (infeasible: safest)")


def markdown_table(rows: list[dict[str, Any]], cost_unit: str, title: str) -> str:
    """Rows in the layout of the paper's Table 1, every method at its calibrated guarantee
    (decision 68), plus cost / large-only, coverage with its CI, escalation columns, and the
    per-step baselines' own scoring compute (PRM / judge) as a separate column."""
    singles = [r for r in rows if r.get("kind") == "single model"]
    large = singles[-1]["cost"] if singles else None  # the largest model alone
    lines = [f"### {title}", "",
             f"| Method | Ext. models | Acc ↑ | Cost ({cost_unit}) ↓ | × large-only | A/C ↑ "
             "| Scorer cost | Coverage [95% CI] | Esc. rate | Mean esc. step | Knob |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["coverage_ci"]
        cost = _fmt(r["cost"], 3) + (f" ± {r['cost_sd']:.3f}" if "cost_sd" in r else "")
        ratio = _fmt(r["cost"] / large, 3) if large else "–"
        lines.append(
            f"| {r['method']} | {r['external']} | {_fmt(r['accuracy'], 1)} | {cost} | {ratio} "
            f"| {_fmt(r['acc_per_cost'], 2)} | {_fmt(r.get('scorer_cost'), 3)} "
            f"| {r['coverage']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {_fmt(r['escalation_rate'], 2)} | {_fmt(r['mean_escalation_step'], 2)} "
            f"| {_knob(r)} |")
    return "\n".join(lines) + "\n"


def matched_line(result: dict[str, Any], cost_unit: str) -> str:
    """"At the router's accuracy, X needs …" (costs on each method's lower hull)."""
    m = result.get("matched") or {}
    if not m.get("costs"):
        return ""
    parts = [f"{name} {_fmt(c, 3)}" for name, c in m["costs"].items()]
    return (f"\nSecondary view, at equal accuracy: at the accuracy of {m['reference']} "
            f"({m['accuracy']:.1f} %, cost {m['cost']:.3f} {cost_unit}), the other methods' test "
            "curves need: " + ", ".join(parts) + " (lower convex hull; – where out of reach).\n")


def guarantee_line(result: dict[str, Any]) -> str:
    """Which guarantee every calibrated row of the table meets (decision 88)."""
    g = result.get("guarantee")
    if not g:
        return ""
    n = g.get("calibration_problems")
    return (f"\nGuarantee of every calibrated row: {describe_guarantee(g)}"
            + (f", calibrated on {n} problems" if n else "")
            + " (`guarantee.conformal_choice`, one rule for every method).\n")


def replay_line(result: dict[str, Any]) -> str:
    """The exported router live against its replay on the trace trees (decision 87)."""
    rep = result.get("replay")
    if not rep:
        return ""
    causes = "; ".join(f"{d['problem_id']}: {d['cause']}" for d in rep["disagreements"][:5])
    more = len(rep["disagreements"]) - 5
    return (f"\nOffline replay vs live (the exported router on the test split, coupled samples): "
            f"{rep['identical']}/{rep['problems']} problems identical (same verdict and cost)"
            + (f" — disagreements: {causes}" + (f" and {more} more" if more > 0 else "")
               if causes else "") + ".\n")


def limits_line(result: dict[str, Any]) -> str:
    """The router against the limits: the perfect-risk reference (a router that knew each
    node's risk exactly, decision 92) and the hindsight oracle (knows the samples)."""
    rows = {r["method"]: r for r in result["rows"]}
    router = next((r for r in result["rows"] if r.get("kind") == "router"
                   and "mean ± sd" in r["method"]), None)
    ref, oracle = rows.get(references.PERFECT_RISK), rows.get(evaluate.ORACLES[1])
    if router is None or ref is None:
        return ""
    return (f"\nAgainst the limits: {router['method']} costs {router['cost'] / ref['cost']:.2f}× "
            "the perfect-risk reference (escalating where 16 fresh rollouts per node and model "
            "say the coverage gain is largest: a limit a router's features could reach)"
            + (f" and {router['cost'] / oracle['cost']:.2f}× the hindsight oracle (which knows "
               "the samples)" if oracle else "") + ".\n")


def draws_table(result: dict[str, Any]) -> str:
    """The spread over data draws (`validity.data_draws`): per α, each calibrated method's cost /
    large-only as mean ± sd over the draws (the data-draw spread) beside the training-seed sd,
    its lowest coverage, and on how many draws it is cheaper than every baseline."""
    d = result.get("draws")
    if not d:
        return ""
    head = (f"\nSpread over data draws: the {d['calibration'] + d['test']} calibration and test "
            f"problems re-split {d['resplits']} times into {d['calibration']} / {d['test']} "
            "(same draws for every method; the trained policies fixed, every knob re-calibrated "
            "per draw by the same rule).\n\n| Method | "
            + " | ".join(f"α = {a:g}: × large-only, mean ± sd over draws (training-seed sd) | "
                         f"α = {a:g}: coverage, mean (lowest)" for a in d["alphas"])
            + " |\n|---|" + "---|---|" * len(d["alphas"]) + "\n")
    methods = list(next(iter(d["alphas"].values())))
    kinds = d.get("kinds", {})
    lines = []
    for m in methods:
        cells = []
        for rows in d["alphas"].values():
            r = rows[m]
            ratio, cov = np.asarray(r["ratio"]), np.asarray(r["coverage"])
            seed = f" ({r['seed_sd']:.3f})" if r["seed_sd"] > 0 else ""
            cells += [f"{ratio.mean():.3f} ± {ratio.std(ddof=1):.3f}{seed}",
                      f"{cov.mean():.3f} ({cov.min():.3f})"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    wins = []
    for a, rows in d["alphas"].items():
        base = [np.asarray(rows[m]["ratio"]) for m in methods if kinds.get(m) == "baseline"]
        if base and methods:
            best = np.min(np.stack(base), 0)
            won = int(np.sum(np.asarray(rows[methods[0]]["ratio"]) < best))
            wins.append(f"α = {a:g}: {won} of {d['resplits']} draws")
    tail = (f"\n{methods[0]} cheaper than every calibrated baseline: " + "; ".join(wins)
            + ".\n") if wins else ""
    return head + "\n".join(lines) + "\n" + tail


def write_report(out: Path, result: dict[str, Any], cost_unit: str, title: str,
                 config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = (markdown_table(result["rows"], cost_unit, title) + guarantee_line(result)
          + limits_line(result) + draws_table(result) + matched_line(result, cost_unit)
          + replay_line(result))
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.json", strict_json(result, indent=2, default=float) + "\n")
    atomic_write_text(out / "config.json", strict_json(config, indent=2, default=str) + "\n")
    plot(out / "accuracy_cost.png", result, cost_unit, title)


MARKERS = ("o", "s", "D", "^", "v", "<", ">", "P", "X", "*", "h", "p", "8", "d", "H")
# Kelly's colours of maximum contrast (without white and black): 20 distinct ones.
COLOURS = ("#0067A5", "#F38400", "#008856", "#BE0032", "#875692", "#848482", "#F3C300",
           "#A1CAF1", "#882D17", "#8DB600", "#E68FAC", "#604E97", "#F99379", "#2B3D26",
           "#C2B280", "#B3446C", "#DCD300", "#654522", "#E25822", "#F6A600")


def plot(path: Path, result: dict[str, Any], cost_unit: str, title: str) -> None:
    """Cost against test coverage, twice: the whole picture on a log cost axis (a
    scorer-inclusive point ten times the rest leaves every other point readable), and a linear
    zoom on the calibrated points near 1 − α, where most methods sit. Each row is its own colour
    and marker at its calibrated point (black edge); a thresholded method's whole test curve is
    a thin line in its colour; a per-step method's generation + scorer compute is a second,
    hollow marker joined by a dotted line and labelled as such. The legend sits outside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    style = {r["method"]: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)])
             for i, r in enumerate(rows)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6), dpi=110, width_ratios=(1.25, 1))
    alpha = result.get("alpha")
    for ax in axes:
        for name, curve in result["curves"].items():
            if not curve or "coverage" not in curve[0]:
                continue
            color = style.get(name, ("grey", None))[0]
            pts = sorted((p["coverage"], p["cost"]) for p in curve if p["cost"] > 0)
            ax.plot([c for c, _ in pts], [k for _, k in pts], lw=0.9, alpha=0.5, color=color)
        for r in rows:
            color, mk = style[r["method"]]
            ax.scatter([r["coverage"]], [r["cost"]], marker=mk, s=70, zorder=3, color=color,
                       edgecolor="black", linewidth=0.6, label=r["method"])
            extra = r.get("scorer_cost")
            if extra and extra == extra and extra > 0:
                total = r["cost"] + extra
                ax.scatter([r["coverage"]], [total], marker=mk, s=70, zorder=3,
                           facecolor="none", edgecolor=color, linewidth=1.4,
                           label=f"{r['method']}: + scorer compute")
                ax.plot([r["coverage"]] * 2, [r["cost"], total], lw=0.9, ls=":", color=color)
        if alpha:
            ax.axvline(1 - alpha, color="grey", lw=0.8, ls="--", label=f"1 − α = {1 - alpha:g}")
        ax.set_xlabel("test coverage P(routed right ∨ large wrong)")
        ax.grid(alpha=0.3, which="both")
    full, zoom = axes
    full.set_yscale("log")
    full.set_ylabel(f"mean cost per problem ({cost_unit})")
    full.set_title("all methods (log cost axis)", fontsize=9)
    # The zoom frames the routers, baselines and references near 1 − α (the dense cluster);
    # oracles and per-step methods far from it stay readable on the left.
    near = [r for r in rows if (alpha is None or r["coverage"] >= 1 - alpha - 0.03)
            and r.get("kind") != "oracle" and r.get("external") != "yes"]
    if near:
        lo_c = min(r["coverage"] for r in near)
        costs = [r["cost"] for r in near]
        pad = 0.06 * (max(costs) - min(costs) or 1.0)
        zoom.set_xlim(lo_c - 0.004, 1.003)
        zoom.set_ylim(min(costs) - pad, max(costs) + pad)
    zoom.set_title("zoom on the cluster near 1 − α (linear cost axis)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    handles, labels = full.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.93),
               title="filled: calibrated point; hollow: + scorer; lines: test curves",
               title_fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


# -- the routing benchmark ------------------------------------------------------------------------

SHORT = {"router (exact CPO, ours)": "router (ours)", "TCPO (paper settings)": "TCPO paper",
         "random escalation": "random", "confidence threshold": "threshold", "STEER": "STEER",
         "risk-to-go classifier (reference)": "risk ref.",
         "threshold table (reference)": "table ref.", references.PERFECT_RISK: "perfect-risk ref.",
         evaluate.ORACLES[1]: "oracle"}


def _pm(m: float, sd: float) -> str:
    return "–" if m != m else f"{m:.3f} ± {sd:.3f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.2f}"


def routing_columns(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The compact table: one row per (world, α), each method's cost / large-only at the
    guarantee (mean ± sd over seeds), the router's coverage and its ratios."""
    methods = [m for m in SHORT if any(r["method"] == m for r in rows)]
    cols = ["world", "α"] + [SHORT[m] for m in methods] + [
        "router coverage (CI ∋ 1−α)", "router / best ref.", "router / perfect-risk ref.",
        "router / oracle", "router seed sd"]
    out = []
    for w, a in sorted({(r["world"], r["alpha"]) for r in rows}):
        sel = {r["method"]: r for r in rows if r["world"] == w and r["alpha"] == a}
        me = sel.get("router (exact CPO, ours)")
        line = [w, a] + [_pm(sel[m]["cost_large"], sel[m]["cost_large_sd"]) if m in sel else "–"
                         for m in methods]
        if me:
            line += [f"{me['coverage']:.3f} ({100 * me['ci_reaches_target']:.0f} %)",
                     f"{me['cost_reference']:.2f}", _ratio(me.get("cost_perfect")),
                     f"{me['cost_oracle']:.2f}", f"{100 * me['train_seed_sd']:.1f} %"]
        else:
            line += ["–"] * 5
        out.append(line)
    return cols, out


def routing_notes(verdicts: list[dict], minutes: float, train_seeds: int, data_seeds: int) -> str:
    n = len(verdicts)
    ok = lambda k: sum(bool(v[k]) for v in verdicts)  # noqa: E731
    miss = [f"{v['world']} α={v['alpha']}" for v in verdicts
            if not (v["coverage_ok"] and v["beats_baselines"] and v["reference_ok"]
                    and v["seed_sd_ok"])]
    return (f"Costs are per problem, divided by large-only on the same test problems; every knob "
            f"is calibrated on the calibration split by the same conformal rule (decision 68). "
            f"Means ± standard deviations over {train_seeds} training seeds × {data_seeds} data "
            f"seed(s) (baselines: over data seeds). Router targets met on {n} (world, α): coverage "
            f"CI reaches 1−α in ≥ 95 % of runs {ok('coverage_ok')}/{n}; cheapest of router, "
            f"random, threshold, STEER {ok('beats_baselines')}/{n}; ≤ 1.05× the best reference "
            f"{ok('reference_ok')}/{n}; training-seed sd ≤ 5 % {ok('seed_sd_ok')}/{n}. "
            + (f"Missed: {', '.join(miss)}. " if miss else "")
            + f"Wall time {minutes:.1f} min.")


def routing_table(rows: list[dict], verdicts: list[dict]) -> str:
    cols, body = routing_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def routing_plot(path: Path, rows: list[dict], world: str) -> None:
    """Cost / large-only against test coverage: each method's calibrated point at every α
    (mean over seeds, bars = sd), joined across α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for m, short in SHORT.items():
        pts = sorted((r["alpha"], r["coverage"], r["cost_large"], r["cost_large_sd"])
                     for r in rows if r["method"] == m)
        if not pts:
            continue
        ax.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts],
                    marker="*" if m.startswith("oracle") else "o", lw=1, capsize=2, label=short)
    for a in sorted({r["alpha"] for r in rows}):
        ax.axvline(1 - a, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("test coverage (each point calibrated to 1 − α on the cal split)")
    ax.set_ylabel("cost / large-only")
    ax.set_title(world)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def ablation_columns(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Trainer variants against the default router and the cheapest calibrated baseline: cost /
    large-only at the guarantee (mean ± sd over training seeds) per (world, α)."""
    variants = sorted({r["method"] for r in rows if r["kind"] == "variant"})
    cols = ["world", "α", "default router", "cheapest baseline"] + [
        v.removeprefix("variant: ") for v in variants]
    out = []
    for w, a in sorted({(r["world"], r["alpha"]) for r in rows}):
        sel = {r["method"]: r for r in rows if r["world"] == w and r["alpha"] == a}
        base = min((sel[m] for m in ("random escalation", "confidence threshold", "STEER")
                    if m in sel), key=lambda r: r["cost_large"], default=None)
        cell = lambda r: _pm(r["cost_large"], r["cost_large_sd"]) if r else "–"  # noqa: E731
        out.append([w, a, cell(sel.get("router (exact CPO, ours)")),
                    f"{base['method']} {base['cost_large']:.3f}" if base else "–"]
                   + [cell(sel.get(v)) for v in variants])
    return cols, out


# -- the validity benchmark -------------------------------------------------------------------------


def validity_columns(records: list[dict]) -> tuple[list[str], list[list]]:
    """One row per (world, α, method): each guarantee's mean test miscoverage (± Monte-Carlo
    standard error), share of re-splits with miscoverage ≤ α, cost / large-only, whether it
    holds, and the price of PAC (its cost over the marginal one's)."""
    by = {(r["world"], r["alpha"], r["method"], r["guarantee"]): r for r in records}
    order = {m: i for i, m in enumerate(SHORT)}
    keys = sorted({k[:3] for k in by}, key=lambda k: (k[0], k[1], order.get(k[2], 99)))
    cols = ["world", "α", "method", "marginal: mean miss.", "share ≤ α", "cost / large",
            "holds", "PAC: mean miss.", "share ≤ α (≥ 1−δ)", "cost / large", "holds",
            "PAC price"]
    rows = []
    for w, a, m in keys:
        line = [w, a, SHORT.get(m, m)]
        got = [by.get((w, a, m, g)) for g in ("marginal", "pac")]
        for r in got:
            if r is None:
                line += ["–"] * 4
                continue
            line += [f"{r['mean_miscoverage']:.4f} ± {r['mc_error']:.4f}",
                     f"{r['share_within']:.3f}", f"{r['cost_large']:.3f}",
                     "yes" if r["holds"] else "**no**"]
        line.append(f"{got[1]['cost'] / got[0]['cost']:.3f}×" if all(got) and got[0]["cost"]
                    else "–")
        rows.append(line)
    return cols, rows


def validity_notes(records: list[dict], delta: float, calibration: int, resplits: int,
                   sizes: tuple[int, ...], minutes: float) -> str:
    """What the table checks, how many cells hold, and every cell that does not."""
    def held(g):
        rs = [r for r in records if r["guarantee"] == g]
        return sum(r["holds"] for r in rs), len(rs), [r for r in rs if not r["holds"]]

    (m_ok, m_n, m_bad), (p_ok, p_n, p_bad) = held("marginal"), held("pac")
    noise = max((r["test_noise"] for r in records), default=float("nan"))
    price = [r_p["cost"] / r_m["cost"] for r_m in records if r_m["guarantee"] == "marginal"
             for r_p in records if r_p["guarantee"] == "pac" and r_p["world"] == r_m["world"]
             and r_p["alpha"] == r_m["alpha"] and r_p["method"] == r_m["method"]
             and r_m["cost"] > 0]
    bad = "; ".join(f"{r['guarantee']} {SHORT.get(r['method'], r['method'])} on {r['world']} "
                    f"α={r['alpha']} (mean {r['mean_miscoverage']:.4f}, share "
                    f"{r['share_within']:.3f})" for r in m_bad + p_bad)
    return (f"Each (world, α): the methods are trained/fitted once on {sizes[0]} train problems; "
            f"{resplits} random re-splits of the other {sizes[1] + sizes[2]} into "
            f"{calibration} calibration and the rest test; every knob calibrated by "
            "`guarantee.conformal_choice` under each guarantee. Marginal holds when the mean "
            "test miscoverage is ≤ α + 2 Monte-Carlo standard errors; PAC (δ = "
            f"{delta:g}) when the share of re-splits with miscoverage ≤ α is ≥ 1 − δ − 2 "
            "binomial standard errors. Test miscoverage estimates each deployed knob's risk "
            f"within ±{noise:.4f} (2 sd of a test set this size), which also moves the share "
            f"≤ α. Marginal holds in {m_ok}/{m_n} cells, PAC in {p_ok}/{p_n}. "
            + (f"Cells that do not hold: {bad}. " if bad else "")
            + (f"Price of PAC (its cost / the marginal one's): median {np.median(price):.3f}×, "
               f"range {min(price):.3f}–{max(price):.3f}×. " if price else "")
            + f"Wall time {minutes:.1f} min.")
