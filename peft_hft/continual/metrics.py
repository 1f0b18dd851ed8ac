"""Continual-learning measures from a task-by-stage score matrix, and plots of it.

Notation: stage ``i`` (0-based) trains task ``t_i``; ``R[i][j]`` is the score on evaluation task ``j`` after stage
``i``; ``b[j]`` the score of the model before any stage (the base model). Over the ``T`` tasks trained in the
sequence (each scored with one evaluation task of the same name):

* **OP** (overall performance, TRACE): ``mean_j R[T-1][j]``, the average score after the last stage.
* **BWT** (backward transfer, Lopez-Paz & Ranzato 2017; TRACE): ``mean_j (R[T-1][j] - R[i_j][j])`` over the tasks
  trained before the last stage, where ``i_j`` is the stage that trained task ``j`` (the last such stage if it was
  trained more than once). Negative means forgetting.
* **FWT** (forward transfer, Lopez-Paz & Ranzato 2017): ``mean_j (R[i_j - 1][j] - b[j])`` over the tasks first trained
  after the first stage: how much the earlier stages alone moved task ``j`` relative to the base model. The baseline
  ``b`` is the base model's score (GEM uses a randomly initialised model; for fine-tuning a pre-trained LLM the
  pre-trained model is the meaningful reference). Needs the base scores.
* **Forgetting** (Chaudhry et al. 2018): ``mean_j (max_{l < T-1} R[l][j] - R[T-1][j])`` over the tasks trained before
  the last stage, counting only stages from ``i_j`` on: the drop from a task's best score to its final one.

Scores are whatever the evaluation returns (accuracy in [0, 1] or in percent); the measures are in the same unit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..utils import format_interval, mean_interval

MatrixOrMatrices = Union["AccuracyMatrix", Mapping[str, "AccuracyMatrix"]]


@dataclass(frozen=True)
class AccuracyMatrix:
    """Scores of evaluation ``tasks`` after each stage (``scores[i][j]``), and optionally before the first (``base``).

    ``stages[i]`` is the task trained at stage ``i``. A missing score is ``nan``.
    """

    tasks: tuple[str, ...]
    stages: tuple[str, ...]
    scores: tuple[tuple[float, ...], ...]
    base: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "scores", tuple(tuple(float(x) for x in row) for row in self.scores))
        if self.base is not None:
            object.__setattr__(self, "base", tuple(float(x) for x in self.base))
        if len(self.scores) != len(self.stages):
            raise ValueError(f"scores has {len(self.scores)} rows for {len(self.stages)} stages; give one per stage.")
        for i, row in enumerate(self.scores):
            if len(row) != len(self.tasks):
                raise ValueError(f"scores row {i} has {len(row)} entries for {len(self.tasks)} tasks.")
        if self.base is not None and len(self.base) != len(self.tasks):
            raise ValueError(f"base has {len(self.base)} entries for {len(self.tasks)} tasks.")
        unknown = [t for t in self.stages if t not in self.tasks]
        if unknown:
            raise ValueError(
                f"Stage task(s) {unknown} have no evaluation column; every trained task needs a score column of the "
                f"same name (columns: {list(self.tasks)})."
            )

    @classmethod
    def from_records(
        cls,
        stage_tasks: Sequence[str],
        stage_metrics: Sequence[Mapping[str, float]],
        base_metrics: Optional[Mapping[str, float]] = None,
        tasks: Optional[Sequence[str]] = None,
    ) -> AccuracyMatrix:
        """Build the matrix from one ``{task: score}`` mapping per stage (and optionally one for the base model).

        ``tasks`` orders the columns; by default the trained tasks in stage order, then any other evaluated tasks.
        """
        if len(stage_tasks) != len(stage_metrics):
            raise ValueError(f"{len(stage_tasks)} stage tasks but {len(stage_metrics)} metric records.")
        if tasks is None:
            seen: dict[str, None] = dict.fromkeys(stage_tasks)
            for record in [*stage_metrics, base_metrics or {}]:
                seen.update(dict.fromkeys(record))
            tasks = list(seen)
        scores = [[float(m.get(t, math.nan)) for t in tasks] for m in stage_metrics]
        base = None if not base_metrics else [float(base_metrics.get(t, math.nan)) for t in tasks]
        return cls(tuple(tasks), tuple(stage_tasks), tuple(map(tuple, scores)), None if base is None else tuple(base))

    # ---------------------------------------------------------------------------------------------------------------
    # Measures
    # ---------------------------------------------------------------------------------------------------------------

    def score(self, stage: int, task: str) -> float:
        return self.scores[stage][self.tasks.index(task)]

    def _trained(self) -> list[tuple[str, int, int]]:
        """(task, first stage, last stage) of every trained task, in order of first training."""
        out: dict[str, list[int]] = {}
        for i, task in enumerate(self.stages):
            out.setdefault(task, []).append(i)
        return [(t, idx[0], idx[-1]) for t, idx in out.items()]

    def _require_stages(self) -> int:
        if not self.stages:
            raise ValueError("The matrix has no stages.")
        return len(self.stages) - 1

    def op(self) -> float:
        """Average score over the trained tasks after the last stage."""
        last = self._require_stages()
        return _mean([self.score(last, t) for t, _, _ in self._trained()])

    def bwt(self) -> float:
        """Backward transfer: mean change of each earlier task from just after it was trained to the end."""
        last = self._require_stages()
        return _mean([self.score(last, t) - self.score(i, t) for t, _, i in self._trained() if i < last])

    def fwt(self) -> float:
        """Forward transfer: mean score of each task just before it was first trained, minus the base model's."""
        self._require_stages()
        if self.base is None:
            raise ValueError("Forward transfer needs the base model's scores (AccuracyMatrix.base).")
        base = dict(zip(self.tasks, self.base, strict=True))
        return _mean([self.score(i - 1, t) - base[t] for t, i, _ in self._trained() if i > 0])

    def forgetting(self) -> float:
        """Average forgetting: mean drop of each earlier task from its best score (after training it) to its last."""
        last = self._require_stages()
        drops = []
        for task, _, trained in self._trained():
            if trained < last:
                best = max(self.score(s, task) for s in range(trained, last))
                drops.append(best - self.score(last, task))
        return _mean(drops)

    def summary(self) -> dict[str, float]:
        """OP, BWT, forgetting and (with base scores) FWT."""
        out = {"OP": self.op(), "BWT": self.bwt(), "forgetting": self.forgetting()}
        if self.base is not None:
            out["FWT"] = self.fwt()
        return out

    def to_markdown(self, digits: int = 1, scale: float = 100.0) -> str:
        """The matrix as a Markdown table: one row per stage (and the base model), one column per task."""
        header = "| after stage | " + " | ".join(self.tasks) + " |"
        lines = [header, "|" + "---|" * (len(self.tasks) + 1)]
        rows = []
        if self.base is not None:
            rows.append(("base model", self.base))
        rows += [(f"{i}: {task}", row) for i, (task, row) in enumerate(zip(self.stages, self.scores, strict=True))]
        for label, row in rows:
            lines.append(f"| {label} | " + " | ".join(_fmt(x * scale, digits) for x in row) + " |")
        return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _fmt(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _as_mapping(matrices: MatrixOrMatrices) -> dict[str, AccuracyMatrix]:
    if isinstance(matrices, AccuracyMatrix):
        return {"": matrices}
    if not matrices:
        raise ValueError("Give at least one AccuracyMatrix.")
    return dict(matrices)


def summary_table(matrices: Mapping[str, AccuracyMatrix], digits: int = 1, scale: float = 100.0) -> str:
    """A Markdown table comparing methods: OP, BWT, FWT (where base scores exist) and forgetting."""
    has_fwt = all(m.base is not None for m in matrices.values())
    columns = ["OP", "BWT"] + (["FWT"] if has_fwt else []) + ["forgetting"]
    lines = ["| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, matrix in matrices.items():
        values = matrix.summary()
        lines.append(f"| {name} | " + " | ".join(_fmt(values[c] * scale, digits) for c in columns) + " |")
    return "\n".join(lines)


def own_stage_scores(matrix: AccuracyMatrix) -> dict[str, float]:
    """Each trained task's score right after the (last) stage that trained it: whether the task was learned at all."""
    return {task: matrix.score(last, task) for task, _, last in matrix._trained()}


def mean_matrix(matrices: Sequence[AccuracyMatrix]) -> AccuracyMatrix:
    """The entry-wise mean of matrices of the same tasks and stages (e.g. one per seed), for tables and plots."""
    if not matrices:
        raise ValueError("Give at least one AccuracyMatrix.")
    first = matrices[0]
    for m in matrices[1:]:
        if (m.tasks, m.stages) != (first.tasks, first.stages) or (m.base is None) != (first.base is None):
            raise ValueError(
                f"Matrices of different runs cannot be averaged: tasks/stages {m.tasks}/{m.stages} vs "
                f"{first.tasks}/{first.stages}. Average only runs of the same task sequence."
            )
    scores = [[_mean([m.scores[i][j] for m in matrices]) for j in range(len(first.tasks))]
              for i in range(len(first.stages))]
    base = None if first.base is None else [_mean([m.base[j] for m in matrices]) for j in range(len(first.tasks))]
    return AccuracyMatrix(first.tasks, first.stages, tuple(map(tuple, scores)), None if base is None else tuple(base))


SEED_MEASURES = ("OP", "BWT", "FWT", "forgetting")


def seed_summary(
    runs: Mapping[str, Sequence[AccuracyMatrix]], reference: Optional[str] = None
) -> dict[str, dict[str, Any]]:
    """OP, BWT, FWT and forgetting of every method over its seeds (mean, std, 95% t-interval, per-seed values), and,
    with ``reference``, the per-seed differences against it (method minus reference on the same seed, which saw the
    same batches; the seeds are paired by position, so give every method its runs in the same seed order).
    """
    out: dict[str, dict[str, Any]] = {}
    summaries = {name: [m.summary() for m in matrices] for name, matrices in runs.items()}
    if reference is not None and reference not in runs:
        raise ValueError(f"reference={reference!r} is not one of the methods {list(runs)}.")
    for name, per_seed in summaries.items():
        entry: dict[str, Any] = {k: mean_interval([s[k] for s in per_seed]) for k in SEED_MEASURES
                                 if all(k in s for s in per_seed)}
        if reference is not None and name != reference:
            ref = summaries[reference]
            n = min(len(ref), len(per_seed))
            entry["paired"] = {k: mean_interval([per_seed[i][k] - ref[i][k] for i in range(n)])
                               for k in SEED_MEASURES if all(k in s for s in per_seed[:n] + ref[:n])}
        out[name] = entry
    return out


def seed_summary_table(summary: Mapping[str, Mapping[str, Any]], digits: int = 1, scale: float = 100.0,
                       paired: bool = False) -> str:
    """Markdown of :func:`seed_summary`: mean [95% t-interval] (per-seed values) of each measure, or, with
    ``paired=True``, of each method's per-seed difference against the reference (methods without one are left out).
    """
    rows = {n: (e["paired"] if paired else e) for n, e in summary.items() if not paired or "paired" in e}
    columns = [k for k in SEED_MEASURES if all(k in e for e in rows.values())]
    lines = ["| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, entry in rows.items():
        cells = [format_interval(entry[c], digits, scale, signed=paired, missing="-") for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_accuracy_matrix(
    matrices: MatrixOrMatrices, path: Union[str, os.PathLike], scale: float = 100.0, title: Optional[str] = None
) -> str:
    """Write a PNG heatmap of the score matrix (one panel per method when given a mapping ``{method: matrix}``).

    Rows are stages (the base model first, when known), columns evaluation tasks; every cell is annotated.
    """
    plt = _pyplot()
    panels = _as_mapping(matrices)
    values = [x * scale for m in panels.values() for row in (*m.scores, *(m.base and [m.base] or [])) for x in row]
    finite = [v for v in values if not math.isnan(v)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    first = next(iter(panels.values()))
    rows = len(first.stages) + (first.base is not None)
    panel_width = max(3.2, 0.85 * len(first.tasks) + 1.8)
    columns = min(len(panels), 2)
    grid_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(1.0 + panel_width * columns, (2.0 + 0.45 * rows) * grid_rows), dpi=120,
        squeeze=False, layout="constrained",
    )
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.axis("off")
    image = None
    for k, (ax, (name, matrix)) in enumerate(zip(flat, panels.items(), strict=False)):
        grid = ([list(matrix.base)] if matrix.base is not None else []) + [list(r) for r in matrix.scores]
        labels = (["base"] if matrix.base is not None else []) + [f"{i}: {t}" for i, t in enumerate(matrix.stages)]
        grid = [[x * scale for x in row] for row in grid]
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                if not math.isnan(value):
                    dark = (value - vmin) / max(vmax - vmin, 1e-9) < 0.6
                    ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(matrix.tasks)))
        ax.set_xticklabels(matrix.tasks, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel("evaluated task", fontsize=8)
        if k % columns == 0:
            ax.set_ylabel("after stage (trained task)", fontsize=8)
        summary = matrix.summary() if matrix.stages else {}
        subtitle = f"OP {summary.get('OP', math.nan) * scale:.1f}  BWT {summary.get('BWT', math.nan) * scale:+.1f}"
        ax.set_title(f"{name}\n{subtitle}" if name else subtitle, fontsize=9)
    fig.colorbar(image, ax=flat[: len(panels)], shrink=0.8, label="score" if scale == 1 else "score (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_task_curves(
    matrices: MatrixOrMatrices, path: Union[str, os.PathLike], scale: float = 100.0, title: Optional[str] = None
) -> str:
    """Write a PNG with one panel per evaluation task: its score across stages, one line per method.

    The x axis starts at the base model (where known); a shaded band marks the stage(s) that trained the task.
    """
    plt = _pyplot()
    panels = _as_mapping(matrices)
    first = next(iter(panels.values()))
    tasks = first.tasks
    columns = min(len(tasks), 4)
    rows_n = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(3.4 * columns, 2.8 * rows_n), dpi=120, squeeze=False)
    offset = 1 if first.base is not None else 0
    ticks = (["base"] if offset else []) + [f"{i}:{t[:10]}" for i, t in enumerate(first.stages)]
    for k, task in enumerate(tasks):
        ax = axes[k // columns][k % columns]
        for name, matrix in panels.items():
            j = matrix.tasks.index(task)
            ys = ([matrix.base[j]] if matrix.base is not None else []) + [row[j] for row in matrix.scores]
            ax.plot(range(len(ys)), [y * scale for y in ys], marker="o", markersize=3, label=name or None)
        for i, trained in enumerate(first.stages):
            if trained == task:
                ax.axvspan(i + offset - 0.5, i + offset + 0.5, color="0.9", zorder=0)
        ax.set_title(task, fontsize=9)
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=40, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(tasks), rows_n * columns):
        axes[k // columns][k % columns].axis("off")
    if any(panels):
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Score of each task across the stages (shaded: the stage that trains it)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
