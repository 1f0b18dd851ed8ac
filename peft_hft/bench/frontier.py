"""The learn-forget frontier of a sweep (``Protocol.sweep``): every run and interpolation as a point (new-task
accuracy, Wikipedia perplexity increase), each method's Pareto frontier, the perplexity increase at matched accuracy,
and how well the KL to the base predicts the perplexity increase.

A point is better when it learned more (higher accuracy) and forgot less (lower perplexity increase). A method's
Pareto frontier is the set of its points that no other of its points beats on both; the base model (alpha 0) is a
point of every method's frontier. Between frontier points the perplexity increase is interpolated linearly in
accuracy: "what this method costs to reach this accuracy".
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..utils import format_interval, mean_interval
from .report import PERPLEXITY_METRIC

# Matched accuracies: these shares of the way from the base's accuracy to the highest accuracy every method reaches.
MATCH_LEVELS = (0.5, 0.75, 1.0)


def point(scores: dict[str, dict[str, float]], base_scores: dict[str, dict[str, float]], task: str,
          kl: Optional[dict[str, float]] = None) -> dict[str, float]:
    """New-task test accuracy (%), Wikipedia perplexity increase (%) and the KLs of one scored model."""
    ppl = scores["wikipedia"][PERPLEXITY_METRIC]
    out = {"acc": 100.0 * scores[f"{task}_test"]["acc"],
           "ppl_increase_pct": 100.0 * (ppl / base_scores["wikipedia"][PERPLEXITY_METRIC] - 1)}
    if kl:
        out["kl_general"], out["kl_task"] = kl["general"], kl["task"]
    return out


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (accuracy, perplexity increase) points no other point beats on both, by increasing accuracy."""
    best = math.inf
    frontier = []
    for acc, ppl in sorted(points, key=lambda p: (-p[0], p[1])):
        if ppl < best:
            frontier.append((acc, ppl))
            best = ppl
    return frontier[::-1]


def cost_at(frontier: Sequence[tuple[float, float]], acc: float) -> Optional[float]:
    """The perplexity increase the frontier needs to reach accuracy ``acc`` (linear between its points); None beyond
    its highest accuracy; its first point's value below its lowest (that point reaches more for less)."""
    if not frontier or acc > frontier[-1][0]:
        return None
    if acc <= frontier[0][0]:
        return frontier[0][1]
    for (a0, p0), (a1, p1) in zip(frontier, frontier[1:], strict=False):
        if a0 <= acc <= a1:
            return p0 if a1 == a0 else p0 + (p1 - p0) * (acc - a0) / (a1 - a0)
    return None  # pragma: no cover - unreachable for a sorted frontier


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (Pearson's of the ranks, ties averaged); None below 3 points or without spread."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def summarise_sweep(results: dict[str, Any], task: str, labels: dict[str, str]) -> dict[str, Any]:
    """Points, per-method frontiers (per seed, and of the seed means per setting), the matched-accuracy table and the
    KL correlations of a sweep (``runner.run_sweep``'s results)."""
    base_scores = results["base"]["scores"]
    base = point(base_scores, base_scores, task, results["base"].get("kl"))
    points: list[dict[str, Any]] = []
    diverged: dict[str, list[str]] = {}
    for method, records in results["runs"].items():
        for r in records:
            if r.get("diverged"):
                diverged.setdefault(method, []).append(r["run"])
                continue
            common = {"method": method, "lr": r["lr"], "seed": r["seed"]}
            points.append({**common, "alpha": 1.0, **point(r["scores"], base_scores, task, r.get("kl"))})
            for mix in r.get("interpolations", []):
                points.append({**common, "alpha": mix["alpha"],
                               **point(mix["scores"], base_scores, task, mix.get("kl"))})
    anchor = (base["acc"], 0.0)
    methods: dict[str, Any] = {}
    for method in results["runs"]:
        mine = [p for p in points if p["method"] == method]
        seeds = sorted({p["seed"] for p in mine})
        per_seed = {s: pareto_frontier([anchor] + [(p["acc"], p["ppl_increase_pct"]) for p in mine if p["seed"] == s])
                    for s in seeds}
        settings: dict[tuple[float, float], list[dict[str, Any]]] = {}
        for p in mine:
            settings.setdefault((p["lr"], p["alpha"]), []).append(p)
        means = [(statistics.fmean(p["acc"] for p in group), statistics.fmean(p["ppl_increase_pct"] for p in group))
                 for group in settings.values()]
        methods[method] = {"label": labels.get(method, method), "seeds": seeds, "per_seed_frontier": per_seed,
                           "frontier": pareto_frontier([anchor] + means),
                           "diverged_runs": diverged.get(method, [])}
    reached = [f[-1][0] for m in methods.values() for f in m["per_seed_frontier"].values()]
    targets = []
    if reached and min(reached) > base["acc"]:
        top = min(reached)
        targets = [base["acc"] + level * (top - base["acc"]) for level in MATCH_LEVELS]
    for entry in methods.values():
        entry["matched"] = [
            {"acc": t, **mean_interval([c for f in entry["per_seed_frontier"].values()
                                        if (c := cost_at(f, t)) is not None])}
            for t in targets
        ]
        entry["max_acc"] = mean_interval([f[-1][0] for f in entry["per_seed_frontier"].values()])
    with_kl = [p for p in points if "kl_general" in p]
    correlation = {
        name: {"spearman": spearman([p[key] for p in with_kl], [p["ppl_increase_pct"] for p in with_kl]),
               "n": len(with_kl)}
        for name, key in (("general", "kl_general"), ("task", "kl_task"))
    }
    return {"task": task, "base": base, "base_scores": base_scores, "points": points, "methods": methods,
            "targets": targets, "kl_correlation": correlation}


def matched_table(summary: dict[str, Any]) -> str:
    """Each method's Wikipedia perplexity increase at matched new-task accuracy: mean [95% t-interval] (per seed)."""
    targets = summary["targets"]
    header = ["Method", "highest accuracy on its frontier (%)"]
    header += [f"ppl increase (%) at {t:.1f}% accuracy" for t in targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary["methods"].values():
        row = [entry["label"], format_interval(entry["max_acc"], signed=False)]
        row += [format_interval(cell, signed=True) + (f" ({cell['n']} of {len(entry['seeds'])} seeds)"
                                                      if cell["n"] < len(entry["seeds"]) else "")
                for cell in entry["matched"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def points_table(summary: dict[str, Any]) -> str:
    """Every point, seed means per (method, lr, alpha): accuracy, perplexity increase and the two KLs."""
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for p in summary["points"]:
        groups.setdefault((p["method"], p["lr"], p["alpha"]), []).append(p)
    lines = ["| Method | lr | alpha | seeds | New task acc (%) | Wikipedia ppl increase (%) | KL general | KL task |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, lr, alpha), group in groups.items():
        cells = []
        for key in ("acc", "ppl_increase_pct", "kl_general", "kl_task"):
            values = [p[key] for p in group if key in p]
            cells.append(f"{statistics.fmean(values):.4g}" if values else "-")
        lines.append(f"| {summary['methods'][method]['label']} | {lr:g} | {alpha:g} | {len(group)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    """Every run (filled) and interpolation (hollow) as a point, each method's frontier of seed means as a line."""
    from ..utils import save_png
    from .plots import COLORS, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, entry in summary["methods"].items():
        color = COLORS.get(method)
        mine = [p for p in summary["points"] if p["method"] == method]
        runs = [p for p in mine if p["alpha"] == 1.0]
        mixes = [p for p in mine if p["alpha"] != 1.0]
        ax.scatter([p["acc"] for p in runs], [p["ppl_increase_pct"] for p in runs], color=color, s=22, alpha=0.7)
        ax.scatter([p["acc"] for p in mixes], [p["ppl_increase_pct"] for p in mixes], facecolors="none",
                   edgecolors=color, s=22, alpha=0.6)
        ax.plot([a for a, _ in entry["frontier"]], [c for _, c in entry["frontier"]], "-", color=color, lw=2,
                label=entry["label"])
    ax.scatter([summary["base"]["acc"]], [0.0], marker="*", color="black", s=120, zorder=5, label="base model")
    for t in summary["targets"]:
        ax.axvline(t, color="grey", lw=0.7, ls=":")
    ax.set_xlabel(f"new task ({summary['task']}) test accuracy (%)")
    ax.set_ylabel("Wikipedia perplexity increase (%)")
    ax.set_yscale("symlog", linthresh=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Learn-forget frontier: runs (filled), base + alpha x diff (hollow), frontiers of seed means")
    save_png(fig, path)
    plt.close(fig)


def plot_kl(summary: dict[str, Any], path: Path) -> None:
    """Perplexity increase against the KL to the base on general text and on the task's prompts, every point."""
    from ..utils import save_png
    from .plots import COLORS, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (name, key, label) in zip(axes, (("general", "kl_general", "held-out general text (C4)"),
                                              ("task", "kl_task", "new-task prompts (answer position)")), strict=True):
        for method, entry in summary["methods"].items():
            mine = [p for p in summary["points"] if p["method"] == method and key in p]
            ax.scatter([p[key] for p in mine], [p["ppl_increase_pct"] for p in mine], color=COLORS.get(method), s=18,
                       alpha=0.7, label=entry["label"])
        rho = summary["kl_correlation"][name]["spearman"]
        ax.set_title(f"{label}: Spearman rho = {rho:.2f}" if rho is not None else label)
        ax.set_xlabel("mean token KL(tuned || base) (nats)")
        ax.set_ylabel("Wikipedia perplexity increase (%)")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_yscale("symlog", linthresh=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def write_sweep_outputs(summary: dict[str, Any], output: Path) -> dict[str, Path]:
    """``sweep.json``, ``sweep.md``, ``frontier.png`` and ``kl_vs_forgetting.png`` in ``output``."""
    from ..utils import atomic_write

    paths = {"json": output / "sweep.json", "markdown": output / "sweep.md",
             "frontier_plot": output / "frontier.png", "kl_plot": output / "kl_vs_forgetting.png"}
    atomic_write(paths["json"], (json.dumps(summary, indent=1) + "\n").encode())
    corr = summary["kl_correlation"]

    def rho(name: str) -> str:
        value = corr[name]["spearman"]
        return "n/a" if value is None else f"{value:+.2f}"

    text = ("## Wikipedia perplexity increase at matched new-task accuracy (per-seed frontiers; mean [95% t-interval] "
            "(per seed))\n\n" + matched_table(summary)
            + f"\nBase model: {summary['base']['acc']:.1f}% new-task accuracy.\n"
            + f"\n## KL to the base as a predictor of the perplexity increase ({corr['general']['n']} points)\n\n"
            + f"- held-out general text: Spearman rho {rho('general')}\n"
            + f"- new-task prompts: Spearman rho {rho('task')}\n"
            + "\n## Every setting (seed means)\n\n" + points_table(summary))
    atomic_write(paths["markdown"], text.encode())
    plot_frontier(summary, paths["frontier_plot"])
    plot_kl(summary, paths["kl_plot"])
    return paths
