"""Human-readable views of an HFT selection: a text table and a PNG map (blocks x tensors, trained vs frozen)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from .layer import find_ledger
from .precision import MASTER_BYTES_PER_ELEMENT, MASTERS_ON_HOST, is_low_precision
from .selection import BLOCK_CATEGORIES, OUTSIDE_CATEGORIES, ModelLayout, Unit, analyze_model

TRAINED, FROZEN = "■", "·"


@dataclass(frozen=True)
class SelectionReport:
    """A selection laid over a model's structure."""

    adapter_name: str
    layout: ModelLayout
    selected: frozenset[str]

    def is_trained(self, unit: Unit) -> bool:
        return unit.name in self.selected

    def columns(self) -> list[tuple[str, str]]:
        """(category, short name) of the block tensors, in category order then model order."""
        seen: dict[tuple[str, str], None] = {}
        for category in BLOCK_CATEGORIES:
            for unit in self.layout.block_units():
                if unit.category == category:
                    seen[(category, unit.short)] = None
        return list(seen)

    def category_counts(self) -> dict[str, tuple[int, int]]:
        """category -> (trained tensors, all tensors); block and outside categories are kept apart."""
        counts: dict[str, list[int]] = {}
        for unit in self.layout.units:
            key = unit.category if unit.block is not None else f"outside/{unit.category}"
            entry = counts.setdefault(key, [0, 0])
            entry[0] += self.is_trained(unit)
            entry[1] += 1
        return {k: (v[0], v[1]) for k, v in counts.items()}


def _resolve(model: nn.Module, adapter_name: Optional[str]) -> SelectionReport:
    ledger = find_ledger(model)
    if ledger is None:
        raise ValueError(
            f"{type(model).__name__} has no HFT adapter. Create one with peft.get_peft_model(model, HFTConfig()) "
            "or load one with PeftModel.from_pretrained(model, path)."
        )
    if adapter_name is None:
        active = [a for a in ledger.active_adapters if a in ledger.hft_adapters]
        adapter_name = active[0] if active else sorted(ledger.hft_adapters)[0]
    if adapter_name not in ledger.hft_adapters:
        raise ValueError(f"No HFT adapter named {adapter_name!r}; available: {sorted(ledger.hft_adapters)}.")
    configs = getattr(ledger.root, "peft_config", {}) or {}
    layers_pattern = getattr(configs.get(adapter_name), "layers_pattern", None)
    return selection_report(ledger.root, ledger.hft_adapters[adapter_name].params, adapter_name, layers_pattern)


def selection_report(
    model: nn.Module, selected: Sequence[str], adapter_name: str = "default", layers_pattern: Optional[str] = None
) -> SelectionReport:
    """A selection (parameter names) laid over ``model``'s structure; the model may live on the meta device, which
    is how ``peft-hft inspect`` describes a saved adapter without loading any weights."""
    return SelectionReport(adapter_name, analyze_model(model, layers_pattern), frozenset(selected))


def _labels(shorts: Sequence[str]) -> list[str]:
    """Shortest dotted suffixes that still tell the names apart."""
    labels = []
    for short in shorts:
        parts = short.split(".")
        for k in range(1, len(parts) + 1):
            label = ".".join(parts[-k:])
            if sum(s == label or s.endswith("." + label) for s in shorts) == 1:
                break
        labels.append(label)
    return labels


def _cell_borders(ax, num_columns: int, num_rows: int) -> None:
    ax.set_xticks([x - 0.5 for x in range(1, num_columns)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, num_rows)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)


def selection_summary(model: nn.Module, adapter_name: Optional[str] = None) -> str:
    """A text summary of which tensors an HFT adapter trains: totals, per-category shares and a per-block table.

    Args:
        model: A PeftModel, HFTModel or transformers model holding HFT adapters.
        adapter_name: The adapter to describe (default: the active one).
    """
    return format_summary(_resolve(model, adapter_name)) + "\n\n" + format_memory(memory_report(model))


def memory_report(model: nn.Module) -> dict[str, int]:
    """Bytes HFT keeps besides the model's own weights, gradients and optimizer state.

    ``master_bytes`` is what the fp32 masters hold now (they are created at the first optimizer step);
    ``master_bytes_when_training`` what they will hold once every trainable low-precision tensor was stepped (per
    element 4 bytes for ``master_weights="fp32"``, 2 for ``"kahan"``, 1 for ``"kahan8"``, none otherwise; on the
    training device), ``master_host_bytes_when_training`` the same in host memory (4 bytes per element for
    ``"fp32_offload"``);
    ``originals_host_bytes`` / ``originals_device_bytes`` the base values kept
    for the diffs, ``disable_adapter`` and ``unmerge``.
    """
    ledger = find_ledger(model)
    if ledger is None:
        raise ValueError(f"{type(model).__name__} has no HFT adapter, so HFT keeps nothing beside its weights.")
    pending = [(p, mode) for p, mode in ledger.master_modes().values() if is_low_precision(p)]
    stored = ledger.originals_bytes()
    return {
        "master_bytes": ledger.masters.nbytes(),
        "master_bytes_when_training": sum(
            MASTER_BYTES_PER_ELEMENT[mode] * p.numel() for p, mode in pending if mode not in MASTERS_ON_HOST),
        "master_host_bytes_when_training": sum(
            MASTER_BYTES_PER_ELEMENT[mode] * p.numel() for p, mode in pending if mode in MASTERS_ON_HOST),
        "originals_host_bytes": stored["host"],
        "originals_device_bytes": stored["device"],
    }


def format_memory(report: dict[str, int]) -> str:
    """One line of :func:`peft_hft.memory_report`: what HFT keeps beside the model's weights."""
    mib = 2**20
    return (
        f"HFT memory beside the weights: master values {report['master_bytes'] / mib:.1f} MiB now, "
        f"{report['master_bytes_when_training'] / mib:.1f} MiB once every trained bf16/fp16 tensor was stepped "
        f"(training device), {report['master_host_bytes_when_training'] / mib:.1f} MiB in host memory; "
        f"originals {report['originals_host_bytes'] / mib:.1f} MiB in host memory, "
        f"{report['originals_device_bytes'] / mib:.1f} MiB on the device"
    )


def format_summary(report: SelectionReport) -> str:
    """The text of :func:`selection_summary` for a :class:`SelectionReport`."""
    units = report.layout.units
    trained = [u for u in units if report.is_trained(u)]
    total_numel = sum(u.numel for u in units)
    trained_numel = sum(u.numel for u in trained)
    lines = [
        f"HFT adapter {report.adapter_name!r}: {len(trained)} of {len(units)} tensors, "
        f"{trained_numel:,} of {total_numel:,} parameters ({100 * trained_numel / max(total_numel, 1):.1f}%) trained",
        "",
        f"{'category':<26}{'trained':>8}{'total':>8}{'share':>9}",
    ]
    counts = report.category_counts()
    for key in [c for c in BLOCK_CATEGORIES if c in counts] + [
        f"outside/{c}" for c in OUTSIDE_CATEGORIES if f"outside/{c}" in counts
    ]:
        done, all_ = counts[key]
        label = key if "/" not in key else key.split("/")[1] + " (outside blocks)"
        lines.append(f"{label:<26}{done:>8}{all_:>8}{100 * done / all_:>8.1f}%")
    columns = report.columns()
    if columns:
        labels = _labels([short for _, short in columns])
        lines += ["", "columns: " + "  ".join(f"{i + 1}={label}" for i, label in enumerate(labels)), ""]
        width = max(2, len(str(len(columns))) + 1)
        lines.append("block " + "".join(f"{i + 1:>{width}}" for i in range(len(columns))))
        cells = {(u.block, u.category, u.short): report.is_trained(u) for u in report.layout.block_units()}
        for block in range(report.layout.num_blocks):
            row = []
            for category, short in columns:
                state = cells.get((block, category, short))
                row.append(" " if state is None else (TRAINED if state else FROZEN))
            lines.append(f"{block:<6}" + "".join(f"{c:>{width}}" for c in row))
    outside = report.layout.outside_units()
    if outside:
        lines += ["", "outside the blocks:"]
        for unit in outside:
            mark = TRAINED if report.is_trained(unit) else FROZEN
            lines.append(f"  {mark} {unit.short} ({unit.category}, {unit.numel:,} parameters)")
    return "\n".join(lines)


def plot_selection(
    model: nn.Module, path: Union[str, os.PathLike], adapter_name: Optional[str] = None, title: Optional[str] = None
) -> str:
    """Write a PNG map of an HFT selection: one row per block, one column per tensor, trained vs frozen.

    Args:
        model: A PeftModel, HFTModel or transformers model holding HFT adapters.
        path: Where to write the PNG (directories are created).
        adapter_name: The adapter to draw (default: the active one).
        title: Plot title (default: the adapter name and the trained share).

    Returns:
        The path written.
    """
    return plot_report(_resolve(model, adapter_name), path, title)


def plot_report(report: SelectionReport, path: Union[str, os.PathLike], title: Optional[str] = None) -> str:
    """The PNG of :func:`plot_selection` for a :class:`SelectionReport`; returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    columns = report.columns()
    outside = report.layout.outside_units()
    num_rows = max(report.layout.num_blocks, 1)
    grid = [[0] * max(len(columns), 1) for _ in range(num_rows)]  # 0 absent, 1 frozen, 2 trained
    index = {(category, short): i for i, (category, short) in enumerate(columns)}
    for unit in report.layout.block_units():
        grid[unit.block][index[(unit.category, unit.short)]] = 2 if report.is_trained(unit) else 1
    side = [[2 if report.is_trained(u) else 1] for u in outside]

    cmap = ListedColormap(["#ffffff", "#d9d9d9", "#1f77b4"])
    fig_w = max(6.0, 0.42 * (len(columns) + (2 if outside else 0)) + 3.0)
    fig_h = max(3.2, 0.2 * max(num_rows, len(outside)) + 2.6)
    widths = [max(len(columns), 1)] + ([1.6] if outside else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(fig_w, fig_h), dpi=120, squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    ax = axes[0][0]
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(_labels([short for _, short in columns]), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("transformer block")
    ax.set_yticks(range(0, num_rows, max(1, num_rows // 16)))
    _cell_borders(ax, len(columns), num_rows)
    previous = None
    for i, (category, _) in enumerate(columns):
        if previous is not None and category != previous:
            ax.axvline(i - 0.5, color="black", linewidth=1.2)
        previous = category
    for category in dict.fromkeys(c for c, _ in columns):
        xs = [i for i, (c, _) in enumerate(columns) if c == category]
        ax.text(sum(xs) / len(xs), -0.7, category.replace("_", "-"), ha="center", va="bottom", fontsize=8)
    if outside:
        side_ax = axes[0][1]
        side_ax.imshow(side, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        side_ax.set_yticks(range(len(outside)))
        side_ax.set_yticklabels([u.short for u in outside], fontsize=8)
        side_ax.yaxis.tick_right()
        side_ax.set_xticks([])
        side_ax.set_title("outside blocks", fontsize=8)
        _cell_borders(side_ax, 1, len(outside))
    trained_numel = sum(u.numel for u in report.layout.units if report.is_trained(u))
    total_numel = sum(u.numel for u in report.layout.units)
    fig.suptitle(
        title or f"HFT selection '{report.adapter_name}': {100 * trained_numel / max(total_numel, 1):.1f}% of "
        "parameters trained (blue = trained, grey = frozen)",
        fontsize=10,
    )
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
