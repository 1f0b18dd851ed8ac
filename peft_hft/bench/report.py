"""Summaries of a finished benchmark: per-method means and spreads, a markdown table, and PNG plots.

Forgetting is measured against the base model: for accuracies ``base - after`` in points (positive = forgot), for
perplexity the relative increase ``after / base - 1`` in percent (positive = forgot).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional

from ..utils import format_interval, mean_interval, mean_std

PERPLEXITY_METRIC = "word_perplexity"
REFERENCE_METHOD = "fft"
# Metrics compared seed by seed against the reference: (key, scale, label); accuracies in points.
PAIRED_METRICS = (
    ("new_task_acc", 100.0, "new-task acc (pts)"),
    ("wikipedia_ppl_increase_pct", 1.0, "Wikipedia ppl increase (pct. points)"),
    ("mean_mc_forgetting_pts", 1.0, "mean MC forgetting (pts)"),
)
# Retention multiple choice is scored cloze style; the length-normalised accuracy is the standard metric there.
RETENTION_MC_METRIC = "acc_norm"


def metrics_of(scores: dict[str, dict[str, float]], base: dict[str, dict[str, float]], task: str) -> dict[str, float]:
    """The reported metrics of one run: new-task accuracy, every retention score and its forgetting."""
    out = {"new_task_acc": scores[f"{task}_test"]["acc"], "new_task_val_acc": scores[f"{task}_validation"]["acc"]}
    mc_drops = []
    for name, values in scores.items():
        if name.startswith(f"{task}_"):
            continue
        if PERPLEXITY_METRIC in values:
            out[f"{name}_ppl"] = values[PERPLEXITY_METRIC]
            out[f"{name}_ppl_increase_pct"] = 100.0 * (values[PERPLEXITY_METRIC] / base[name][PERPLEXITY_METRIC] - 1)
        else:
            out[f"{name}_acc"] = values[RETENTION_MC_METRIC]
            out[f"{name}_forgetting_pts"] = 100.0 * (base[name][RETENTION_MC_METRIC] - values[RETENTION_MC_METRIC])
            mc_drops.append(out[f"{name}_forgetting_pts"])
    if mc_drops:
        out["mean_mc_forgetting_pts"] = statistics.fmean(mc_drops)
    return out


def paired_differences(per_seed: dict[str, dict[int, dict[str, float]]], reference: str = REFERENCE_METHOD):
    """Seed-by-seed differences of every method against ``reference`` (same seed = same batches, same order).

    For each metric of ``PAIRED_METRICS``: the per-seed differences (method minus reference, in points), their mean
    and a 95% t-interval; and, for the Wikipedia perplexity increase, the per-seed ratio method / reference (the
    issue's target is a ratio of at most 0.6 at a new-task accuracy no lower than the reference's).
    """
    if reference not in per_seed:
        return {}
    ref = per_seed[reference]
    out = {}
    for name, seeds in per_seed.items():
        if name == reference:
            continue
        common = sorted(set(seeds) & set(ref))
        entry: dict[str, Any] = {"seeds": common}
        for key, scale, _ in PAIRED_METRICS:
            if all(key in seeds[s] and key in ref[s] for s in common):
                entry[key] = mean_interval([scale * (seeds[s][key] - ref[s][key]) for s in common])
        ppl = "wikipedia_ppl_increase_pct"
        if common and all(ppl in seeds[s] and ref[s].get(ppl) for s in common):
            entry["wikipedia_ppl_increase_ratio"] = mean_interval([seeds[s][ppl] / ref[s][ppl] for s in common])
        out[name] = entry
    return out


def summarise(results: dict[str, Any], task: str, labels: dict[str, str], ratios: dict[str, Optional[float]]):
    """Per-method aggregates over seeds at the chosen learning rate, and the grid (first seed, every rate)."""
    base_scores = results["base"]["scores"]
    base_metrics = metrics_of(base_scores, base_scores, task)
    methods = {}
    by_seed: dict[str, dict[int, dict[str, float]]] = {}
    for name, records in results["finals"].items():
        ok = [r for r in records if not r.get("diverged")]
        per_seed = [metrics_of(r["scores"], base_scores, task) for r in ok]
        by_seed[name] = {r["seed"]: m for r, m in zip(ok, per_seed, strict=True)}
        keys = per_seed[0].keys() if per_seed else []
        methods[name] = {
            "label": labels[name],
            "ratio": ratios[name],
            "lr": results["chosen"][name],
            "seeds": [r["seed"] for r in ok],
            "diverged_seeds": [r["seed"] for r in records if r.get("diverged")],
            "trainable_parameters": ok[0]["train"]["trainable_parameters"] if ok else None,
            "train_seconds": mean_std([r["train"]["seconds"] for r in ok]),
            "train_cpu_seconds": mean_std([r["train"].get("cpu_seconds", 0.0) for r in ok]),
            "metrics": {k: mean_std([m[k] for m in per_seed]) for k in keys},
        }
    grid = {
        name: [
            {"lr": r["lr"], "diverged": r.get("diverged", False)}
            | ({} if r.get("diverged") else {"val_acc": r["scores"][f"{task}_validation"]["acc"]})
            for r in records
        ]
        for name, records in results["grid"].items()
    }
    return {"task": task, "base": base_metrics, "base_scores": base_scores, "methods": methods, "grid": grid,
            "paired": paired_differences(by_seed), "timing": _timing(results)}


def _per_seed(method: dict[str, Any]) -> dict[int, dict[str, float]]:
    """A summarised method's per-seed metric values, by seed (the inverse of the aggregation in summarise)."""
    return {seed: {k: stat["values"][i] for k, stat in method["metrics"].items()}
            for i, seed in enumerate(method["seeds"])}


# Protocol fields that may differ between summaries that are combined (which methods ran, in which order).
_COMBINABLE = ("methods",)


def combine_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from the ``results.json`` of several runs of the same protocol with different methods (e.g.
    methods added later in a fresh directory): the methods and grids side by side, and the paired differences
    recomputed over all of them against full fine-tuning's per-seed values.

    Refused unless the runs agree on everything that defines a result: the protocol apart from ``methods``, and the
    base model's scores (a run that re-evaluated the base must have got the same numbers, up to 1e-9 relative).
    A method present in several summaries must be identical in each.
    """
    if not summaries:
        raise ValueError("Give at least one results.json to combine.")
    first = summaries[0]
    for other in summaries[1:]:
        mine = {k: v for k, v in first.get("protocol", {}).items() if k not in _COMBINABLE}
        theirs = {k: v for k, v in other.get("protocol", {}).items() if k not in _COMBINABLE}
        if mine != theirs:
            different = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"These results come from different protocols (they differ in {different}); only runs of the same "
                "protocol (apart from --methods) can be combined. Rerun the missing methods with the same settings."
            )
        for key, value in first["base"].items():
            if abs(other["base"][key] - value) > 1e-9 * max(1.0, abs(value)):
                raise ValueError(
                    f"The base model scored differently in these runs ({key}: {value} vs {other['base'][key]}), so "
                    "their forgetting is not measured from the same point; combine only runs of the same base model "
                    "and evaluation."
                )
    methods: dict[str, Any] = {}
    grid: dict[str, Any] = {}
    for summary in summaries:
        for name, method in summary["methods"].items():
            if name in methods and methods[name] != method:
                raise ValueError(f"Method {name!r} appears in two of these results with different values; keep it in "
                                 "one of them only.")
            methods[name] = method
            grid[name] = summary["grid"][name]
    timing: dict[str, float] = {}
    for summary in summaries:
        for key, value in summary.get("timing", {}).items():
            timing[key] = timing.get(key, 0.0) + value
    protocol = {**first.get("protocol", {}), "methods": list(methods)}
    return {"task": first["task"], "base": first["base"], "base_scores": first["base_scores"], "methods": methods,
            "grid": grid, "paired": paired_differences({n: _per_seed(m) for n, m in methods.items()}),
            "timing": timing, "protocol": protocol}


def _timing(results: dict[str, Any]) -> dict[str, float]:
    """Wall and CPU seconds spent training and evaluating, over every run (each training counted once)."""
    trained = [r for records in results["grid"].values() for r in records]
    trained += [r for records in results["finals"].values() for r in records[1:]]
    evaluated = trained + [records[0] for records in results["finals"].values()] + [results["base"]]
    totals = {"train_runs": float(len(trained)), "evaluations": float(len(evaluated))}
    for key in ("seconds", "cpu_seconds"):
        totals[f"train_{key}"] = sum(r.get("train", {}).get(key, 0.0) for r in trained)
        totals[f"eval_{key}"] = sum(r.get("eval", {}).get(key, 0.0) for r in evaluated)
    return totals


def _fmt(stat: dict[str, Any], digits: int = 1, scale: float = 1.0, signed: bool = False) -> str:
    if stat["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{stat['mean'] * scale:{sign}.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per method: chosen lr, new-task accuracy, each retention score with its forgetting (mean ± std)."""
    base = summary["base"]
    retention = [k.removesuffix("_acc") for k in base if k.endswith("_acc") and not k.startswith("new_task")]
    perplexity = [k.removesuffix("_ppl") for k in base if k.endswith("_ppl")]
    header = ["Method", "lr", "New task acc (%)"]
    header += [f"{n} ppl (Δ%)" for n in perplexity] + [f"{n} acc_norm (%) (forgot, pts)" for n in retention]
    header += ["Mean MC forgetting (pts)", "Trainable params"]
    rows = [
        ["Base model", "-", f"{100 * base['new_task_acc']:.1f}"]
        + [f"{base[f'{n}_ppl']:.2f}" for n in perplexity]
        + [f"{100 * base[f'{n}_acc']:.1f}" for n in retention]
        + ["-", "-"]
    ]
    for method in summary["methods"].values():
        m = method["metrics"]
        if not m:
            rows.append([method["label"], f"{method['lr']:g}", "diverged"] + [""] * (len(header) - 3))
            continue
        row = [method["label"], f"{method['lr']:g}", _fmt(m["new_task_acc"], scale=100)]
        row += [f"{_fmt(m[f'{n}_ppl'], 2)} ({_fmt(m[f'{n}_ppl_increase_pct'], 1, signed=True)})" for n in perplexity]
        row += [f"{_fmt(m[f'{n}_acc'], scale=100)} ({_fmt(m[f'{n}_forgetting_pts'], signed=True)})" for n in retention]
        row += [_fmt(m["mean_mc_forgetting_pts"], signed=True) if "mean_mc_forgetting_pts" in m else "-"]
        row += [_count(method["trainable_parameters"]) if method["trainable_parameters"] else "-"]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def paired_table(summary: dict[str, Any]) -> str:
    """Per-seed differences against full fine-tuning: mean [95% t-interval] (the seeds' values)."""
    paired = summary.get("paired") or {}
    if not paired:
        return ""
    header = ["Method", "seeds"] + [label for _, _, label in PAIRED_METRICS] + ["Wikipedia ppl increase / FFT's"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in paired.items():
        row = [summary["methods"][name]["label"], ",".join(map(str, entry["seeds"]))]
        row += [format_interval(entry.get(key)) for key, _, _ in PAIRED_METRICS]
        ratio = entry.get("wikipedia_ppl_increase_ratio")
        row.append(format_interval(ratio, 2).replace("+", "") if ratio else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def grid_table(summary: dict[str, Any]) -> str:
    """The learning-rate grid (first seed): the validation accuracy each rate was chosen by."""
    lines = ["| Method | lr | Validation acc (%) | Chosen |", "|---|---|---|---|"]
    for name, points in summary["grid"].items():
        method = summary["methods"][name]
        for point in points:
            score = "diverged" if point["diverged"] else f"{100 * point['val_acc']:.1f}"
            chosen = "yes" if point["lr"] == method["lr"] else ""
            lines.append(f"| {method['label']} | {point['lr']:g} | {score} | {chosen} |")
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def precision_note(summary: dict[str, Any]) -> str:
    """The sentence that says in which precision a table's runs trained and were scored (empty when unknown)."""
    precision = summary.get("protocol", {}).get("precision")
    if precision is None:
        return ""
    what = "bf16 autocast with fp32 weights" if precision == "bf16" else "fp32"
    return f"Precision: {what} (`--precision {precision}`), for training and scoring.\n\n"


def write_outputs(summary: dict[str, Any], output: Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and the PNG plots in ``output``; returns their paths."""
    from ..utils import atomic_write
    from .plots import plot_forgetting_vs_new_task, plot_paired_differences, plot_retention_per_ratio

    paths = {
        "json": output / "results.json",
        "markdown": output / "results.md",
        "forgetting_plot": output / "forgetting_vs_new_task.png",
        "ratio_plot": output / "retention_per_ratio.png",
    }
    if summary.get("paired"):
        paths["paired_plot"] = output / "paired_differences.png"
    atomic_write(paths["json"], (json.dumps(summary, indent=1) + "\n").encode())
    text = "## Results (mean ± std over seeds, chosen learning rate)\n\n" + precision_note(summary) + markdown_table(
        summary)
    if summary.get("paired"):
        text += ("\n## Paired differences against full fine-tuning (method minus FFT, same seed; mean [95% "
                 "t-interval] (per seed))\n\n" + paired_table(summary))
    text += "\n## Learning-rate grid (first seed)\n\n" + grid_table(summary)
    atomic_write(paths["markdown"], text.encode())
    plot_forgetting_vs_new_task(summary, paths["forgetting_plot"])
    plot_retention_per_ratio(summary, paths["ratio_plot"])
    if "paired_plot" in paths:
        plot_paired_differences(summary, paths["paired_plot"], PAIRED_METRICS)
    return paths
