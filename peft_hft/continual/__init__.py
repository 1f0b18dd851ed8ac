"""Continual learning with HFT (the paper's third setting): a sequence of stages on one model, a new mask per stage,
every stage's diff kept on disk, replay, and the standard continual-learning measures.

* :class:`ContinualHFT` runs the stages (policies ``"random"``, ``"complementary"``, ``"fixed"``, ``"calibrated"``);
* :class:`StageHistory` reads the on-disk history, rebuilds any stage exactly, re-weights stages, exports;
* :class:`ReplayBuffer` mixes a share of earlier tasks' data into each stage;
* :class:`AccuracyMatrix`, :func:`summary_table`, :func:`plot_accuracy_matrix`, :func:`plot_task_curves`: OP, BWT,
  FWT and forgetting from a task-by-stage score matrix, as tables and PNG plots; :func:`seed_summary`,
  :func:`seed_summary_table`, :func:`mean_matrix` and :func:`own_stage_scores` for runs over several seeds.

See ``docs/continual.md``.
"""

from __future__ import annotations

from .history import StageHistory, StageRecord, apply_diffs, read_diffs, weight_fingerprint, weights_digest
from .metrics import (
    AccuracyMatrix,
    mean_matrix,
    own_stage_scores,
    plot_accuracy_matrix,
    plot_task_curves,
    seed_summary,
    seed_summary_table,
    summary_table,
)
from .replay import ReplayBuffer
from .stages import POLICIES, ContinualHFT

__all__ = [
    "POLICIES",
    "AccuracyMatrix",
    "ContinualHFT",
    "ReplayBuffer",
    "StageHistory",
    "StageRecord",
    "apply_diffs",
    "mean_matrix",
    "own_stage_scores",
    "plot_accuracy_matrix",
    "plot_task_curves",
    "read_diffs",
    "seed_summary",
    "seed_summary_table",
    "summary_table",
    "weight_fingerprint",
    "weights_digest",
]
