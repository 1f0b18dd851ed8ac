"""PNG plots of a benchmark summary (see ``report.summarise``): forgetting against new-task score, and retention
against the share of tensors trained."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils import save_png

COLORS = {"fft": "tab:red", "hft": "tab:blue", "hft_r0.25": "tab:cyan", "hft_r0.75": "tab:purple",
          "hft_model": "tab:orange", "lora": "tab:green", "hft_snr": "tab:brown", "hft_wanda": "tab:pink",
          "hft_fisher": "tab:olive", "hft_grad": "tab:gray"}


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (plots are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _forgetting_axes(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric key, axis label) of each forgetting measure present: perplexity increase, mean MC forgetting."""
    base = summary["base"]
    axes = [(f"{k.removesuffix('_ppl')}_ppl_increase_pct", f"{k.removesuffix('_ppl')} perplexity increase (%)")
            for k in base if k.endswith("_ppl")]
    if any(k.endswith("_acc") and not k.startswith("new_task") for k in base):
        axes.append(("mean_mc_forgetting_pts", "mean multiple-choice forgetting (points)"))
    return axes


def plot_forgetting_vs_new_task(summary: dict[str, Any], path: Path) -> None:
    """One panel per forgetting measure: each method's mean (± std over seeds) against its new-task accuracy, with
    the individual seeds as faint dots. Lower right is best: learned the task, forgot little."""
    plt = pyplot()
    axes_spec = _forgetting_axes(summary)
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.5 * len(axes_spec), 4.4), squeeze=False)
    base_acc = 100 * summary["base"]["new_task_acc"]
    for ax, (key, ylabel) in zip(axes[0], axes_spec, strict=True):
        for name, method in summary["methods"].items():
            m = method["metrics"]
            if key not in m or m[key]["mean"] is None:
                continue
            color = COLORS.get(name)
            xs = [100 * v for v in m["new_task_acc"]["values"]]
            ax.scatter(xs, m[key]["values"], color=color, alpha=0.3, s=18)
            ax.errorbar(100 * m["new_task_acc"]["mean"], m[key]["mean"], xerr=100 * m["new_task_acc"]["std"],
                        yerr=m[key]["std"], fmt="o", color=color, capsize=3, label=method["label"])
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.axvline(base_acc, color="grey", lw=0.8, ls=":", label="base model")
        ax.set_xlabel(f"new task ({summary['task']}) test accuracy (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Forgetting vs. new-task score (mean ± std over seeds)")
    save_png(fig, path)
    plt.close(fig)


def plot_retention_per_ratio(summary: dict[str, Any], path: Path) -> None:
    """Retention and new-task accuracy against the share of tensors trained (HFT at each ratio, FFT at 1.0), with
    the model-level random half and LoRA as reference markers and the base model as a dashed line."""
    plt = pyplot()
    base = summary["base"]
    panels = [("new_task_acc", "new-task test accuracy (%)", 100.0, 100 * base["new_task_acc"])]
    panels += [(k, f"{k.removesuffix('_ppl')} perplexity", 1.0, base[k]) for k in base if k.endswith("_ppl")]
    panels += [(k, f"{k.removesuffix('_acc')} accuracy (%)", 100.0, 100 * base[k])
               for k in base if k.endswith("_acc") and not k.startswith("new_task")]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    ladder = sorted(
        (m["ratio"], name) for name, m in summary["methods"].items()
        if name in ("fft", "hft") or name.startswith("hft_r")
    )
    for ax, (key, ylabel, scale, base_value) in zip(axes.flat, panels, strict=False):
        points = [(r, summary["methods"][n]["metrics"].get(key)) for r, n in ladder]
        points = [(r, s) for r, s in points if s and s["mean"] is not None]
        if points:
            ax.errorbar([r for r, _ in points], [scale * s["mean"] for _, s in points],
                        yerr=[scale * s["std"] for _, s in points], fmt="-o", color="tab:blue", capsize=3,
                        label="HFT (category) / FFT at 1.0")
        for name, marker in (("hft_model", "s"), ("lora", "^")):
            method = summary["methods"].get(name)
            stat = method["metrics"].get(key) if method else None
            if stat and stat["mean"] is not None:
                x = method["ratio"] if method["ratio"] is not None else 0.0
                label = method["label"] + (" (no base tensor trained)" if name == "lora" else "")
                ax.errorbar([x], [scale * stat["mean"]], yerr=[scale * stat["std"]], fmt=marker,
                            color=COLORS[name], capsize=3, label=label)
        ax.axhline(base_value, color="grey", ls="--", lw=0.8, label="base model")
        ax.set_xlabel("share of tensors trained")
        ax.set_ylabel(ylabel)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    list(axes.flat)[0].legend(fontsize=7)
    fig.suptitle("Retention per ratio (mean ± std over seeds)")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_paired_differences(summary: dict[str, Any], path: Path, metrics: Sequence[tuple[str, float, str]]) -> None:
    """One panel per paired metric (``report.PAIRED_METRICS``: key, scale, label): each method's per-seed difference
    against full fine-tuning (dots) and the mean with its 95% t-interval. Left of zero on the forgetting panels =
    forgot less than FFT on the same seed."""
    plt = pyplot()
    paired = summary.get("paired") or {}
    names = list(paired)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 0.9 + 0.5 * len(names)),
                             squeeze=False)
    for ax, (key, _, label) in zip(axes[0], metrics, strict=True):
        for row, name in enumerate(names):
            stat = paired[name].get(key)
            if not stat or stat["mean"] is None:
                continue
            color = COLORS.get(name, "black")
            ax.scatter(stat["values"], [row] * len(stat["values"]), color=color, alpha=0.4, s=18)
            if stat.get("ci95"):
                lo, hi = stat["ci95"]
                ax.errorbar([stat["mean"]], [row], xerr=[[stat["mean"] - lo], [hi - stat["mean"]]], fmt="o",
                            color=color, capsize=3)
            else:
                ax.plot([stat["mean"]], [row], "o", color=color)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([summary["methods"][n]["label"] for n in names] if ax is axes[0][0] else [""] * len(names))
        ax.set_xlabel(f"{label}, method minus FFT")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Paired differences against full fine-tuning (per seed; mean and 95% t-interval)")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
