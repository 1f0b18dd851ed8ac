"""Continual learning with HFT: a sequence of stages on one model, each with its own mask.

The paper's third setting: tasks arrive one after another, and HFT re-draws which half of the tensors trains at every
stage; that roughly halves the forgetting of earlier tasks compared with sequential full fine-tuning. A stage:

1. draws a mask for the running model according to the *policy*;
2. wraps the model in a fresh HFT adapter with that mask (``get_peft_model``) and hands it to any training code: a
   plain loop, ``transformers.Trainer``, a TRL trainer;
3. saves the adapter (the stage's diff) into the stage history on disk and folds it into the running model.

Folding applies the diff *as read back from disk* (the arithmetic of PEFT's loader), so the running model is always
exactly ``base + diff_0 + ... + diff_k`` and the history rebuilds every stage bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from peft import PeftModel, get_peft_model
from torch import nn

from ..tuner.config import HFTConfig
from ..tuner.layer import find_ledger
from ..tuner.selection import resolve_selection
from ..utils import atomic_directory
from .history import MANIFEST, StageHistory, StageRecord, apply_diffs, read_diffs, stage_dirname, weights_digest

POLICIES = ("random", "complementary", "fixed", "calibrated")
# Config fields that define the draw; a resumed run must agree with the history on them.
_SELECTION_FIELDS = (
    "task_type", "ratio", "strategy", "seed", "train_embeddings", "target_modules", "exclude_modules", "layers_pattern",
    "selected_parameters", "diff_dtype", "modules_to_save", "trainable_token_indices",
)
Evaluate = Callable[[nn.Module], Mapping[str, float]]
# ``calibrate(running_model, stage_index) -> HFTConfig`` with ``selected_parameters`` filled (``peft_hft.calibrate``)
CalibrateStage = Callable[[nn.Module, int], HFTConfig]


def _config_record(config: HFTConfig) -> dict[str, Any]:
    """The fields of ``config`` every stage's config copies (JSON-ready, for the manifest)."""
    record = config.to_dict()
    return {k: v for k, v in record.items() if k in _SELECTION_FIELDS or k in ("originals_device", "init_weights")}


class ContinualHFT:
    """Runs a sequence of HFT stages on one model and keeps every stage's diff in a stage history on disk.

    Args:
        model: The base model (a ``transformers`` model). It is trained *in place*: between stages it is the running
            model (``base`` plus the diffs of the finished stages), a plain model without adapters.
        config: The HFT configuration of every stage (ratio, strategy, ...). Its ``seed`` seeds the first stage's
            mask; the policy decides the others.
        output_dir: Directory of the stage history (see :class:`StageHistory`). Must be new or empty, unless
            ``resume=True``.
        policy: How each stage's mask is drawn:
            ``"random"`` (the paper): a fresh draw per stage, with seed ``config.seed + stage index``.
            ``"complementary"``: a fresh draw (same seeds) that trains as few of the tensors trained in the previous
            stage as the strategy's structure allows (for ``ratio=0.5`` with the paper's category strategy: none of
            the block tensors; embeddings, ``lm_head`` and the final norm train at every stage).
            ``"fixed"``: the first stage's mask at every stage (or ``config.selected_parameters`` if given).
            ``"calibrated"``: each stage's mask is chosen by ``calibrate`` on the running model as it is when the
            stage starts (an importance score, e.g. what the previous stages' knowledge needs least); the mask and
            the calibration record are stored with the stage, so a resumed run re-uses them.
        evaluate: Optional ``evaluate(model) -> {task: score}``, called on the base model when the run starts and on
            the running model after every stage; the scores go into the manifest (see
            :meth:`StageHistory.accuracy_matrix`). Scores can also be logged with :meth:`log_metrics`.
        resume: Continue the history in ``output_dir``: the finished stages are re-applied to ``model`` (which must
            be the base the run started from) and the next stage continues the sequence.
        calibrate: For ``policy="calibrated"`` only: ``calibrate(running_model, stage_index) -> HFTConfig`` with
            ``selected_parameters`` filled, e.g.
            ``lambda model, k: peft_hft.calibrate(model, general_text, strategy="wanda", seed=k)``. It must leave
            the model unchanged (``peft_hft.calibrate`` does).

    Example, with a plain loop and with ``transformers.Trainer``:
        ```py
        >>> continual = ContinualHFT(model, HFTConfig(ratio=0.5, seed=0), "runs/cl", policy="random")
        >>> with continual.stage("sarcasm") as peft_model:
        ...     train(peft_model, sarcasm_data)  # any loop over peft_model's trainable parameters
        >>> with continual.stage("quartz") as peft_model:
        ...     Trainer(model=peft_model, args=args, train_dataset=quartz_data).train()
        >>> continual.model  # base + both diffs; continual.history rebuilds every stage
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        config: HFTConfig,
        output_dir: Union[str, os.PathLike],
        policy: str = "random",
        evaluate: Optional[Evaluate] = None,
        resume: bool = False,
        calibrate: Optional[CalibrateStage] = None,
    ) -> None:
        if not isinstance(config, HFTConfig):
            raise TypeError(f"config must be an HFTConfig, got {type(config).__name__}.")
        if policy not in POLICIES:
            raise ValueError(f"Unknown policy {policy!r}; choose one of {', '.join(map(repr, POLICIES))}.")
        if (policy == "calibrated") != (calibrate is not None):
            raise ValueError(
                "policy='calibrated' needs calibrate=fn(model, stage_index) -> HFTConfig (e.g. a call of "
                "peft_hft.calibrate), and calibrate is only used by that policy: pass both or neither."
                if policy == "calibrated" else
                f"calibrate= is only used by policy='calibrated', not policy={policy!r}; pass policy='calibrated' "
                "to choose each stage's mask with it, or drop calibrate."
            )
        if config.selected_parameters is not None and policy != "fixed":
            raise ValueError(
                f"config.selected_parameters fixes the mask, but policy={policy!r} draws a new one per stage. Use "
                "policy='fixed' to train that selection at every stage, or leave selected_parameters as None."
            )
        if isinstance(model, PeftModel) or find_ledger(model) is not None:
            raise ValueError(
                "ContinualHFT needs a plain model without adapters; it adds (and folds) one HFT adapter per stage. "
                "Merge existing adapters first (model = peft_model.merge_and_unload())."
            )
        self.config = config
        self.policy = policy
        self.calibrate = calibrate
        self._calibrated: Optional[HFTConfig] = None  # the next stage's calibrated config, once computed
        self.evaluate = evaluate
        self._model = model
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._peft_model: Optional[PeftModel] = None
        self._open_task: Optional[str] = None
        self._open_info: dict[str, Any] = {}
        path = Path(output_dir)
        if resume and (path / MANIFEST).exists():
            self.history = StageHistory(path)
            self._check_resumable()
            self.history.load(model)  # checks the base, rebuilds the last stage exactly
            for name, param in model.named_parameters():
                param.requires_grad_(self._requires_grad[name])
        else:
            if path.exists() and any(path.iterdir()):
                hint = " or pass resume=True to continue it" if (path / MANIFEST).exists() else ""
                raise FileExistsError(f"{path} is not empty; choose a new directory for the stage history{hint}.")
            self.history = StageHistory.create(path, policy=policy, config=_config_record(config), base_model=model)
        if evaluate is not None:
            if not self.history.base_metrics and not self.history.stages:
                self.history.log_metrics(evaluate(model), stage="base")
            elif self.history.stages and not self.history.stages[-1].metrics:  # died before evaluating the last stage
                self.history.log_metrics(evaluate(model), stage=-1)

    def _check_resumable(self) -> None:
        history = self.history
        if history.policy != self.policy:
            raise ValueError(
                f"The stage history in {history.path} was run with policy={history.policy!r}, not {self.policy!r}. "
                "Resume with the same policy, or start a new history."
            )
        mine = _config_record(self.config)
        different = sorted(k for k in mine if k in history.config and history.config[k] != mine[k])
        if different:
            details = ", ".join(f"{k}: {history.config[k]!r} there vs {mine[k]!r} here" for k in different)
            raise ValueError(
                f"The stage history in {history.path} was run with another HFTConfig ({details}). Resume with the "
                "same config, or start a new history."
            )

    # ---------------------------------------------------------------------------------------------------------------
    # State
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The running model: ``base`` plus the diffs of the finished stages (during a stage, without its update)."""
        return self._model

    @property
    def peft_model(self) -> PeftModel:
        """The HFT-wrapped model of the open stage."""
        if self._peft_model is None:
            raise RuntimeError("No stage is open; start one with continual.stage(task) or continual.start_stage(task).")
        return self._peft_model

    @property
    def num_stages(self) -> int:
        """Finished stages."""
        return len(self.history.stages)

    # ---------------------------------------------------------------------------------------------------------------
    # Masks
    # ---------------------------------------------------------------------------------------------------------------

    def draw_mask(self, index: Optional[int] = None) -> tuple[int, list[str]]:
        """The seed and the selected parameter names of stage ``index`` (default: the next one) under the policy.

        Deterministic in the config, the policy and (for ``"complementary"``) the previous stage's mask, so drawing
        never changes the model and a resumed run draws the same masks.
        """
        index = self.num_stages if index is None else index
        if index > self.num_stages:
            raise ValueError(f"Stage {index} cannot be drawn before stage {self.num_stages} has run.")
        previous = self.history.stages[index - 1] if index > 0 else None
        if self.policy == "calibrated":
            if index < self.num_stages:
                recorded = self.history.stages[index]
                return recorded.seed, list(recorded.selected_parameters)
            calibrated = self._calibrated_config()
            return calibrated.seed, list(calibrated.selected_parameters)
        if self.policy == "fixed":
            if previous is not None:
                return previous.seed, list(previous.selected_parameters)
            if self.config.selected_parameters is not None:
                return self.config.seed, list(self.config.selected_parameters)
            return self.config.seed, resolve_selection(self._model, self.config)
        seed = self.config.seed + index
        stage_config = HFTConfig(**{**_config_record(self.config), "seed": seed, "selected_parameters": None})
        avoid = previous.selected_parameters if (self.policy == "complementary" and previous is not None) else ()
        return seed, resolve_selection(self._model, stage_config, avoid=avoid)

    def _calibrated_config(self) -> HFTConfig:
        """The next stage's config from ``calibrate`` (computed once per stage: calibration passes cost time)."""
        if self._calibrated is None:
            calibrated = self.calibrate(self._model, self.num_stages)
            if not isinstance(calibrated, HFTConfig) or calibrated.selected_parameters is None:
                raise TypeError(
                    "calibrate(model, stage_index) must return an HFTConfig with selected_parameters filled (what "
                    f"peft_hft.calibrate returns), got {type(calibrated).__name__}"
                    + ("" if not isinstance(calibrated, HFTConfig) else " without selected_parameters") + "."
                )
            self._calibrated = calibrated
        return self._calibrated

    # ---------------------------------------------------------------------------------------------------------------
    # Stages
    # ---------------------------------------------------------------------------------------------------------------

    def start_stage(self, task: str, **info: Any) -> PeftModel:
        """Open a stage for ``task``: draw its mask and return the running model wrapped in a fresh HFT adapter.

        Train the returned model with anything, then call :meth:`end_stage` (or use :meth:`stage`). Extra keyword
        arguments (e.g. ``steps=100, lr=1e-5``) are stored with the stage in the manifest.
        """
        if self._peft_model is not None:
            raise RuntimeError(
                f"Stage {self.num_stages} ({self._open_task!r}) is still open; end it with end_stage() (or "
                "abort_stage()) before starting another."
            )
        if not isinstance(task, str) or not task:
            raise ValueError(f"task must be a non-empty string naming the stage's task, got {task!r}.")
        seed, names = self.draw_mask()
        fields = {**_config_record(self.config), "seed": seed, "selected_parameters": names}
        if self.policy == "calibrated":
            fields["calibration"] = self._calibrated_config().calibration  # saved in the stage's adapter config
        stage_config = HFTConfig(**fields)
        self._peft_model = get_peft_model(self._model, stage_config)
        self._open_task = task
        self._open_info = dict(info)
        return self._peft_model

    def end_stage(self, metrics: Optional[Mapping[str, float]] = None, **info: Any) -> nn.Module:
        """Close the open stage: save its diff into the history, fold it into the running model, evaluate.

        If saving fails (e.g. a full disk), nothing is written and the stage stays open: fix the cause and call
        ``end_stage()`` again, or ``abort_stage()``.

        Args:
            metrics: Scores (task -> score) of the model after this stage, if measured elsewhere; ``evaluate`` (if
                set) is called as well.
            info: More key/values stored with the stage (e.g. ``train_loss=...``).

        Returns:
            The running model (plain, without adapters) after the stage.
        """
        peft_model = self.peft_model
        index = self.num_stages
        task = self._open_task
        adapter = stage_dirname(index, task)
        start_fingerprint = self.history.stages[-1].end_fingerprint if index else self.history.base_digest
        stage_config = peft_model.peft_config["default"]
        # If saving fails (e.g. a full disk), nothing is written and the stage stays open: call end_stage() again or
        # abort_stage(). Overwrite: a directory of this name is only left by a run that died before recording it.
        with atomic_directory(self.history.path / adapter, overwrite=True) as staging:
            peft_model.save_pretrained(staging)
            diffs = read_diffs(staging, self._model)
        peft_model.unload()  # back to the model the stage started from, exactly
        self._peft_model = None
        apply_diffs(self._model, diffs)  # fold in the diff as saved (checked before anything is changed)
        for name, param in self._model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, False))
        selected = list(stage_config.selected_parameters)
        previous = set(self.history.stages[-1].selected_parameters) if index else set()
        numel = {name: p.numel() for name, p in self._model.named_parameters()}
        record = StageRecord(
            index=index,
            task=task,
            adapter=adapter,
            policy=self.policy,
            seed=stage_config.seed,
            selected_parameters=selected,
            num_parameters=sum(numel[n] for n in selected),
            overlap_tensors=sum(n in previous for n in selected),
            overlap_parameters=sum(numel[n] for n in selected if n in previous),
            start_fingerprint=start_fingerprint,
            end_fingerprint=weights_digest(self._model),
            metrics={str(k): float(v) for k, v in (metrics or {}).items()},
            info={**self._open_info, **info},
        )
        self._open_task, self._open_info = None, {}
        self._calibrated = None  # the next stage calibrates on the model this stage produced
        self.history.append(record)
        if self.evaluate is not None:
            self.history.log_metrics(self.evaluate(self._model), stage=index)
        return self._model

    def abort_stage(self) -> nn.Module:
        """Discard the open stage: the running model goes back to where the stage started; nothing is saved."""
        peft_model = self.peft_model
        peft_model.unload()
        self._peft_model = None
        self._open_task, self._open_info = None, {}
        for name, param in self._model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, False))
        return self._model

    @contextlib.contextmanager
    def stage(self, task: str, **info: Any) -> Iterator[PeftModel]:
        """``with continual.stage(task) as peft_model: ...``: :meth:`start_stage`, then :meth:`end_stage` on success,
        or :meth:`abort_stage` (and re-raise) if the block fails."""
        peft_model = self.start_stage(task, **info)
        try:
            yield peft_model
        except BaseException:
            self.abort_stage()
            raise
        self.end_stage()

    def record_info(self, **info: Any) -> None:
        """Store key/values (e.g. ``train_loss=0.4``) with the open stage, or with the last finished one if none is
        open. Unlike metrics, they do not enter the accuracy matrix."""
        if self._peft_model is not None:
            self._open_info.update(info)
        elif self.history.stages:
            self.history.stages[-1].info.update(info)
            self.history.write()
        else:
            raise RuntimeError("No stage is open or finished; there is no stage to record information for.")

    def log_metrics(self, metrics: Mapping[str, float], stage: Union[int, str] = -1) -> None:
        """Record scores (task -> score) for a finished stage (default: the last) or for ``"base"``."""
        if stage != "base" and not self.history.stages:
            raise ValueError("No stage has finished yet; log the base model's scores with stage='base'.")
        self.history.log_metrics(metrics, stage)

    def __repr__(self) -> str:
        open_stage = f", open={self._open_task!r}" if self._open_task else ""
        return f"ContinualHFT(policy={self.policy!r}, stages={self.history.tasks}{open_stage})"


