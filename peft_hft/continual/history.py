"""The stage history: every stage of a continual run as its own HFT adapter on disk, plus a manifest.

Not to be confused with the *ledger* (``HFTLayer`` at ``model.hft``), the in-model bookkeeping of one model's live
adapters. The stage history is a directory::

    history/
        manifest.json          order, task names, seeds, masks, weight digests, metrics
        stage_00_<task>/       a normal HFT adapter (adapter_config.json + adapter_model.safetensors)
        stage_01_<task>/
        ...

Stage ``k``'s adapter holds its diff relative to the model *after stage k-1*, so it loads with
``PeftModel.from_pretrained`` onto that model, and the model after stage ``k`` is ``base + diff_0 + ... + diff_k``.
:class:`StageHistory` rebuilds it exactly: the continual runner folds every stage by applying the diff *as read back
from disk*, with the same arithmetic as PEFT's loader, so the rebuilt weights are bit-identical to the running
model's, and a digest of the weights recorded after each stage proves it on every load. Stages can also be
dropped or re-weighted (task arithmetic, ``base + sum_i w_i * diff_i``) and the result exported as a plain checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..format.encoding import apply_diff
from ..format.fingerprint import digest
from ..format.keys import ADAPTER_WEIGHTS
from ..format.reader import read_adapter
from ..tuner.layer import find_ledger
from ..tuner.selection import canonical_parameter_names
from ..utils import atomic_directory, atomic_write, check_output
from .metrics import AccuracyMatrix

MANIFEST = "manifest.json"
FORMAT = "peft-hft-stage-history"
VERSION = 1

StageKey = Union[int, str]


@dataclass
class StageRecord:
    """What the manifest keeps about one stage."""

    index: int
    task: str
    adapter: str  # sub-directory of the history holding the stage's HFT adapter
    policy: str
    seed: int
    selected_parameters: list[str]
    num_parameters: int  # parameters in the selected tensors
    overlap_tensors: int  # selected tensors that the previous stage also trained
    overlap_parameters: int  # parameters in those tensors
    start_fingerprint: str  # of the weights the stage started from (the model after the previous stage)
    end_fingerprint: str  # of the weights after folding this stage in
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageRecord:
        """Read a manifest entry; keys a later peft-hft may add are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter of ``model`` (names, shapes, dtypes and raw bytes): one digest of a whole model.

    Not a *base fingerprint* (:mod:`peft_hft.format.fingerprint`: per-tensor records an adapter keeps of its base);
    the manifest keeps its historical keys (``base_fingerprint``, ``start_fingerprint``, ``end_fingerprint``) for
    these digests, so that existing histories load; for the same reason it stays SHA-256 throughout, where base
    fingerprints moved to XXH3.

    Recorded for the base and after every stage: loading a history checks that it starts from exactly the recorded
    base, and that a rebuilt stage is bit-identical to the model the run had.
    """
    h = hashlib.sha256()
    for name, param in tqdm(list(model.named_parameters()), desc="Hashing weights", leave=False, disable=None):
        h.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{digest(param, 'sha256')}\n".encode())
    return h.hexdigest()


weight_fingerprint = weights_digest  # the earlier name, kept for existing callers


def read_diffs(adapter_dir: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """The diffs of a saved HFT adapter, keyed by parameter name (canonical names of ``model``, if given).

    Read with the package's one strict reader, so a damaged stage is refused exactly as ``from_pretrained`` would.
    """
    adapter = read_adapter(adapter_dir, what="stage adapter")
    bases = None
    if model is not None and adapter.encoding.kind == "exact":  # exact steps count from the model's own values
        names = dict(zip(adapter.diffs, canonical_parameter_names(model, list(adapter.diffs)), strict=True))
        ledger = find_ledger(model)  # a model with the adapter still applied: its base values are in the ledger
        bases = {
            name: ledger.original(names[name]) if ledger is not None else model.get_parameter(names[name]).detach()
            for name in adapter.diffs
        }
    diffs = adapter.diff_tensors(bases)
    if model is not None:
        diffs = dict(zip(canonical_parameter_names(model, list(diffs)), diffs.values(), strict=True))
    return diffs


@torch.no_grad()
def apply_diffs(model: nn.Module, diffs: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
    """Add ``weight * diff`` to the named parameters of ``model``, in float32, written back in each tensor's dtype.

    With ``weight=1`` this is exactly the arithmetic of loading an HFT adapter (``HFTLayer.set_diffs``, and
    :func:`peft_hft.format.encoding.apply_diff`, which does the work), which is what makes the runner's folded model
    and a
    history rebuilt from disk bit-identical.
    """
    if find_ledger(model) is not None:
        raise ValueError(
            f"{type(model).__name__} holds live HFT adapters, whose bookkeeping would not see these diffs. Apply "
            "diffs to a plain model (peft_model.merge_and_unload() or .unload() first)."
        )
    params = {}
    for name in diffs:
        try:
            params[name] = model.get_parameter(name)
        except AttributeError:
            raise ValueError(
                f"The diff of {name!r} has no parameter in {type(model).__name__}; the history belongs to another "
                "model architecture."
            ) from None
        if tuple(params[name].shape) != tuple(diffs[name].shape):
            raise ValueError(
                f"The diff of {name} has shape {tuple(diffs[name].shape)} but the model's tensor has "
                f"{tuple(params[name].shape)}; the history belongs to another model."
            )
    for name, diff in diffs.items():
        param = params[name]
        delta = diff.to(param.device)
        if weight != 1.0:
            delta = delta.float() * weight
        param.data = apply_diff(param.data, delta, param.dtype)


def stage_dirname(index: int, task: str) -> str:
    """``stage_03_<task>`` with the task name reduced to file-name-safe characters."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", task).strip("-.") or "task"
    return f"stage_{index:02d}_{slug[:60]}"


class StageHistory:
    """A stage history on disk (see the module docstring): read it, rebuild any stage, re-weight and export.

    Example:
        ```py
        >>> history = StageHistory("runs/continual")
        >>> model = history.load(base_model, upto=1)  # exactly the model after the second stage
        >>> model = history.load(fresh_base, weights={"sarcasm": 0.0, "quartz": 0.5})  # drop one, halve another
        >>> history.export(another_base, "merged/", upto=-1, tokenizer=tokenizer)
        ```
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} does not exist: {self.path} is not a stage history. A history is written by "
                "peft_hft.continual.ContinualHFT(..., output_dir=...)."
            )
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"{manifest} is not a peft-hft stage history manifest (format {data.get('format')!r}).")
        if data.get("version", 0) > VERSION:
            raise ValueError(
                f"{manifest} was written by a newer peft-hft (history version {data['version']}, this one reads "
                f"{VERSION}). Upgrade peft-hft."
            )
        self._data = data
        self.stages = [StageRecord.from_dict(s) for s in data["stages"]]

    # ---------------------------------------------------------------------------------------------------------------
    # Writing (used by ContinualHFT)
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Union[str, os.PathLike], *, policy: str, config: Mapping[str, Any], base_model: nn.Module
    ) -> StageHistory:
        """Start an empty history in ``path`` (which must not hold one yet)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path} already holds a stage history; resume it or choose another directory.")
        path.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "version": VERSION,
            "policy": policy,
            "config": dict(config),
            "base_model": getattr(getattr(base_model, "config", None), "name_or_path", None) or None,
            "base_fingerprint": weights_digest(base_model),
            "dtype": str(next(base_model.parameters()).dtype).removeprefix("torch."),
            "base_metrics": {},
            "stages": [],
        }
        atomic_write(path / MANIFEST, (json.dumps(data, indent=1) + "\n").encode())
        return cls(path)

    def write(self) -> None:
        """Rewrite the manifest (atomically) from the records in memory."""
        self._data["stages"] = [asdict(s) for s in self.stages]
        atomic_write(self.path / MANIFEST, (json.dumps(self._data, indent=1) + "\n").encode())

    def append(self, record: StageRecord) -> None:
        """Record a stage whose adapter directory is in place (the manifest is the commit)."""
        if not (self.path / record.adapter / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"The adapter of stage {record.index} is missing from {self.path}.")
        self.stages.append(record)
        self.write()

    def log_metrics(self, metrics: Mapping[str, float], stage: Union[int, str] = -1) -> None:
        """Record evaluation scores (task -> score) for a stage (index, default the last) or ``"base"``."""
        clean = {str(k): float(v) for k, v in metrics.items()}
        if stage == "base":
            self._data.setdefault("base_metrics", {}).update(clean)
        else:
            self.stages[self._index(stage)].metrics.update(clean)
        self.write()

    # ---------------------------------------------------------------------------------------------------------------
    # Reading
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def policy(self) -> str:
        return self._data["policy"]

    @property
    def config(self) -> dict[str, Any]:
        """The HFTConfig fields the run was started with (the per-stage seed and mask are in the stage records)."""
        return dict(self._data["config"])

    @property
    def base_digest(self) -> str:
        """:func:`weights_digest` of the base the run started from."""
        return self._data["base_fingerprint"]

    base_fingerprint = base_digest  # the earlier name

    @property
    def base_metrics(self) -> dict[str, float]:
        return dict(self._data.get("base_metrics") or {})

    @property
    def tasks(self) -> list[str]:
        """The task trained at each stage, in order."""
        return [s.task for s in self.stages]

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"StageHistory({str(self.path)!r}, policy={self.policy!r}, stages={self.tasks})"

    def _index(self, key: StageKey) -> int:
        """Stage index of ``key``: an index (negative counts from the end) or a task name trained exactly once."""
        if isinstance(key, bool):
            raise TypeError(f"A stage is named by its index or task name, not by {key!r}.")
        if isinstance(key, int):
            if not -len(self.stages) <= key < len(self.stages):
                raise IndexError(f"Stage {key} does not exist; the history has {len(self.stages)} stage(s).")
            return key % len(self.stages)
        hits = [s.index for s in self.stages if s.task == key]
        if not hits:
            raise KeyError(f"No stage trained task {key!r}; the stages are {self.tasks}.")
        if len(hits) > 1:
            raise KeyError(f"Task {key!r} was trained at stages {hits}; name the stage by its index instead.")
        return hits[0]

    def stage_dir(self, stage: StageKey) -> Path:
        """The directory of a stage's HFT adapter (load it with ``PeftModel.from_pretrained`` onto the model after the
        previous stage)."""
        return self.path / self.stages[self._index(stage)].adapter

    def diffs(self, stage: StageKey, model: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """A stage's diffs, keyed by parameter name."""
        return read_diffs(self.stage_dir(stage), model)

    def check_base(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` unless ``model`` has exactly the weights the history was trained from."""
        found = weights_digest(model)
        if found != self.base_digest:
            raise ValueError(
                f"The model's weights (digest {found}) are not the base this stage history was trained from "
                f"({self.base_digest}, {self._data.get('base_model')!r} in {self._data.get('dtype')}). Load the "
                "same base checkpoint in the same dtype, or pass check_base=False to apply the diffs anyway "
                "(the result is then not the trained model)."
            )

    def _weights(self, upto: int, weights: Union[Mapping[StageKey, float], Sequence[float], None]) -> list[float]:
        if weights is None:
            return [1.0] * (upto + 1)
        if isinstance(weights, Mapping):
            out = [1.0] * (upto + 1)
            for key, w in weights.items():
                index = self._index(key)
                if index > upto:
                    raise ValueError(f"weights names stage {key!r} (index {index}), beyond upto={upto}.")
                out[index] = float(w)
            return out
        weights = [float(w) for w in weights]
        if len(weights) != upto + 1:
            raise ValueError(
                f"weights has {len(weights)} entries for {upto + 1} stage(s) (0..{upto}); give one weight per stage, "
                "or a mapping {stage index or task: weight}."
            )
        return weights

    @torch.no_grad()
    def load(
        self,
        model: nn.Module,
        upto: StageKey = -1,
        weights: Union[Mapping[StageKey, float], Sequence[float], None] = None,
        check_base: bool = True,
    ) -> nn.Module:
        """Turn the base ``model`` (in place) into ``base + sum_i w_i * diff_i`` over the stages ``0..upto``.

        Args:
            model: The base model the run started from (same checkpoint and dtype), e.g. freshly loaded.
            upto: Last stage to include: an index (``-1``, the default, is the last stage) or a task name.
            weights: Per-stage weights for task arithmetic: a sequence with one weight per included stage, or a
                mapping ``{stage index or task name: weight}`` (unnamed stages keep weight 1). Weight 0 drops a
                stage. Without weights, the result is bit-identical to the model the run had after stage ``upto``
                (checked against the digest recorded then).
            check_base: Refuse a model that is not the recorded base (default). Turn off only to apply the diffs to
                another model on purpose.

        Returns:
            ``model``, changed in place.
        """
        if not self.stages:
            raise ValueError(f"The stage history in {self.path} has no stages yet.")
        last = self._index(upto)
        factors = self._weights(last, weights)
        if check_base:
            self.check_base(model)
        for index in tqdm(range(last + 1), desc="Applying stage diffs", disable=last < 1):
            if factors[index] != 0.0:
                apply_diffs(model, self.diffs(index, model), factors[index])
        if check_base and all(w == 1.0 for w in factors):
            found = weights_digest(model)
            if found != self.stages[last].end_fingerprint:
                raise RuntimeError(
                    f"Rebuilding stage {last} gave weights with digest {found}, but the run recorded "
                    f"{self.stages[last].end_fingerprint}. The adapter files in {self.path} were changed after the "
                    "run; re-run the affected stages."
                )
        return model

    def export(
        self,
        model: nn.Module,
        output_dir: Union[str, os.PathLike],
        upto: StageKey = -1,
        weights: Union[Mapping[StageKey, float], Sequence[float], None] = None,
        tokenizer: Any = None,
        check_base: bool = True,
        overwrite: bool = False,
    ) -> Path:
        """Write ``base + sum_i w_i * diff_i`` (see :meth:`load`) as a plain checkpoint (``save_pretrained``).

        The checkpoint is written to a temporary directory next to ``output_dir`` and moved into place when
        complete; an existing ``output_dir`` is refused unless ``overwrite=True``, and so is one that is, lies inside
        or contains the history itself (overwriting it would delete the stages), with or without ``overwrite``.
        """
        output_dir = Path(output_dir)
        inputs = {"stage history": self.path}
        check_output(output_dir, overwrite, inputs)  # refuse before the work
        self.load(model, upto=upto, weights=weights, check_base=check_base)
        with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs) as staging:
            model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        return output_dir

    def accuracy_matrix(self, tasks: Optional[Sequence[str]] = None) -> AccuracyMatrix:
        """The task-by-stage score matrix from the metrics logged after every stage (and before the first)."""
        return AccuracyMatrix.from_records(
            stage_tasks=self.tasks,
            stage_metrics=[s.metrics for s in self.stages],
            base_metrics=self.base_metrics or None,
            tasks=tasks,
        )
