"""Turn a fully fine-tuned checkpoint into an HFT diff adapter (``peft-hft diff TUNED BASE OUT``).

A full fine-tune changes every tensor; shipping it costs a full model. Stored as ``tuned - base`` for the tensors that
changed (or for a chosen half, as HFT would have trained), it becomes an ordinary HFT adapter: loadable with
``PeftModel.from_pretrained``, mergeable with ``peft-hft merge``, verified against its base. Restricting a full
fine-tune to a selection is lossy (the changes of the other tensors are dropped); the result reports how much of the
change was kept.

Both checkpoints are streamed tensor by tensor (see :mod:`peft_hft.format.checkpoint`); the diffs are spooled to a
scratch file and the adapter is written atomically.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from ..format.checkpoint import (
    Checkpoint,
    PathLike,
    SafetensorsWriter,
    TensorEntry,
    meta_model,
    parameter_aliases,
    read_tensor,
)
from ..format.fingerprint import make_fingerprint, tensor_fingerprint
from ..format.keys import ADAPTER_WEIGHTS, diff_key
from ..integrations.hub import update_model_card
from ..tuner.config import HFTConfig
from ..tuner.selection import canonical_parameter_names, resolve_selection, validate_selection
from ..utils import atomic_directory, check_output, float_dtype

CHANGED = "changed"
_TASK_TYPES = (
    (r"ForCausalLM$", "CAUSAL_LM"),
    (r"ForConditionalGeneration$|ForSeq2SeqLM$", "SEQ_2_SEQ_LM"),
    (r"ForSequenceClassification$", "SEQ_CLS"),
    (r"ForTokenClassification$", "TOKEN_CLS"),
    (r"ForQuestionAnswering$", "QUESTION_ANS"),
)


@dataclass(frozen=True)
class ExtractResult:
    output: Path
    selected: tuple[str, ...]
    changed: tuple[str, ...]  # every parameter that differs between TUNED and BASE
    dropped: tuple[str, ...]  # changed but outside the selection
    kept_change: float  # share of the total squared change (Frobenius) that the adapter keeps, in [0, 1]
    adapter_bytes: int
    base_bytes: int


def task_type_of(config: Optional[dict]) -> Optional[str]:
    for architecture in (config or {}).get("architectures") or []:
        for pattern, task in _TASK_TYPES:
            if re.search(pattern, architecture):
                return task
    return None


def _parameter_keys(
    base: Checkpoint, model: Optional[torch.nn.Module]
) -> tuple[dict[str, str], set[str]]:
    """``parameter name -> checkpoint key`` for the stored parameters, and the keys that are not parameters."""
    aliases = parameter_aliases(model)
    if not aliases:  # no model structure: every stored tensor counts as a parameter of that name
        return {key: key for key in base.entries}, set()
    keys: dict[str, str] = {}
    for canonical, names in aliases.items():
        stored = [n for n in names if n in base.entries]
        if stored:
            keys[canonical] = stored[0]
    used = set(keys.values()) | {n for names in aliases.values() for n in names}
    return keys, {k for k in base.entries if k not in used}


def _resolve_selection(
    selection: Union[str, list[str], HFTConfig], model: Optional[torch.nn.Module], keys: dict[str, str]
) -> Optional[list[str]]:
    """The parameter names to keep, or ``None`` for "every changed tensor"."""
    if isinstance(selection, str):
        if selection != CHANGED:
            raise ValueError(f"selection must be {CHANGED!r}, a list of parameter names, or an HFTConfig.")
        return None
    if isinstance(selection, HFTConfig):
        if model is None:
            raise ValueError(
                "An HFTConfig-style selection (ratio/strategy) needs the model's structure, but BASE has no "
                "config.json of a transformers architecture. Fix: pass the tensors to keep as a list of names."
            )
        names = list(selection.selected_parameters) if selection.selected_parameters else resolve_selection(
            model, selection
        )
    else:
        names = list(selection)
    if model is not None:
        names = canonical_parameter_names(model, names)
        validate_selection(model, names)
    unknown = [n for n in names if n not in keys]
    if unknown:
        raise ValueError(f"The selection names tensors that BASE does not store: {unknown[:5]}.")
    return names


def extract_adapter(
    tuned: PathLike,
    base: PathLike,
    output: PathLike,
    *,
    selection: Union[str, list[str], HFTConfig] = CHANGED,
    diff_dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    base_revision: Optional[str] = None,
    tuned_revision: Optional[str] = None,
) -> ExtractResult:
    """Write an HFT adapter holding ``tuned - base`` for the selected tensors.

    Args:
        tuned: The fine-tuned checkpoint (directory or Hub repo id, safetensors).
        base: The checkpoint it was fine-tuned from; becomes the adapter's ``base_model_name_or_path``.
        output: Adapter directory to create (atomically).
        selection: ``"changed"`` (every tensor that differs), a list of parameter names, or an ``HFTConfig`` whose
            strategy picks the tensors (e.g. ``HFTConfig(ratio=0.5, seed=0)``: the half HFT would have trained).
        diff_dtype: Dtype of the stored diffs (default: each base tensor's dtype); see ``HFTConfig.diff_dtype``.
    """
    inputs = {"TUNED": tuned, "BASE": base}
    check_output(output, overwrite, inputs)  # before anything is read
    dtype = float_dtype(diff_dtype, "diff_dtype")
    base_ckpt = Checkpoint.open(base, base_revision, what="BASE")
    tuned_ckpt = Checkpoint.open(tuned, tuned_revision, what="TUNED")
    inputs = {"TUNED directory": tuned_ckpt.source.directory, "BASE directory": base_ckpt.source.directory}
    model = meta_model(base_ckpt.source.directory)
    keys, non_parameters = _parameter_keys(base_ckpt, model)
    extra = sorted(set(tuned_ckpt.entries) - set(base_ckpt.entries))
    if extra:
        raise ValueError(
            f"TUNED stores tensors that BASE lacks ({extra[:5]}); an HFT adapter can only describe changes of the "
            "base's own tensors. Fix: pass the checkpoint TUNED was fine-tuned from as BASE."
        )
    reshaped = [
        f"{k}: {base_ckpt.entries[k].shape} in BASE vs {tuned_ckpt.entries[k].shape} in TUNED"
        for k in tuned_ckpt.entries
        if tuned_ckpt.entries[k].shape != base_ckpt.entries[k].shape
    ]
    if reshaped:
        raise ValueError(
            "TUNED and BASE differ in tensor shapes (a resized vocabulary?): " + "; ".join(reshaped[:5])
            + ". An HFT adapter stores same-shape diffs only."
        )
    chosen = _resolve_selection(selection, model, keys)
    candidates = [
        name for name, key in keys.items()
        if key in tuned_ckpt.entries and base_ckpt.entries[key].dtype.is_floating_point
    ]

    changed: list[str] = []
    kept: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []  # name, dtype, shape, offset in the spool
    records = {}
    total_change = kept_change = 0.0
    bar = tqdm(total=sum(base_ckpt.entries[keys[n]].nbytes for n in candidates), unit="B", unit_scale=True,
               desc="Comparing", disable=not progress)
    with atomic_directory(output, overwrite=overwrite, inputs=inputs) as staging, bar:
        spool_path = staging / ".diffs.spool"
        with open(spool_path, "wb") as spool:
            for name in candidates:
                key = keys[name]
                before = base_ckpt.read(key)
                after = tuned_ckpt.read(key)
                differs = not torch.equal(after.to(before.dtype), before) or after.dtype != before.dtype
                bar.update(base_ckpt.entries[key].nbytes)
                if differs:
                    changed.append(name)
                selected = name in chosen if chosen is not None else differs
                if not differs and not selected:
                    continue
                diff32 = after.float() - before.float()
                change = float(diff32.double().pow(2).sum())
                total_change += change
                if not selected:
                    continue
                kept_change += change
                diff = diff32.to(dtype or before.dtype).contiguous()
                kept.append((name, diff.dtype, tuple(diff.shape), spool.tell()))
                if diff.numel():
                    spool.write(diff.reshape(-1).view(torch.uint8).numpy())
                records[name] = tensor_fingerprint(before)
        moved = [k for k in sorted(non_parameters & set(tuned_ckpt.entries)) if not torch.equal(
            tuned_ckpt.read(k), base_ckpt.read(k))]
        if moved:
            warnings.warn(
                f"TUNED changed stored tensors that are not parameters of the model ({moved[:5]}); HFT adapters hold "
                "parameter diffs only, so these changes are not in the adapter.",
                stacklevel=2,
            )
        if not kept:
            raise ValueError(
                "TUNED and BASE hold identical values for every selected tensor; there is nothing to store. "
                "Check that TUNED is the fine-tuned checkpoint and BASE the one it started from."
            )
        adapter_bytes = _write_weights(staging, spool_path, kept)
        selected_names = [name for name, *_ in kept]
        config = _adapter_config(selection, selected_names, base_ckpt, diff_dtype, records)
        config.save_pretrained(str(staging))
        dropped = tuple(n for n in changed if n not in set(selected_names))
        share = 1.0 if total_change == 0 else kept_change / total_change
        update_model_card(
            staging,
            {"default": config},
            base_model=config.base_model_name_or_path,
            sizes={"default": adapter_bytes},
            provenance=(
                f"Extracted with `peft-hft diff` from the fully fine-tuned checkpoint `{tuned_ckpt.source.name}`: "
                f"{len(selected_names)} of the {len(changed)} changed tensors kept, holding "
                f"{100 * share:.1f}% of the squared weight change."
            ),
        )
    return ExtractResult(
        Path(output).expanduser().absolute(), tuple(selected_names), tuple(changed), dropped, share, adapter_bytes,
        base_ckpt.total_bytes,
    )


def _write_weights(staging: Path, spool_path: Path, kept: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> int:
    """Copy the spooled diffs into ``adapter_model.safetensors`` under their HFT keys; returns the tensor bytes."""
    layout = [(diff_key(name), dtype, shape) for name, dtype, shape, _ in kept]
    where = {diff_key(name): (dtype, shape, offset) for name, dtype, shape, offset in kept}
    total = 0
    with open(spool_path, "rb") as spool, SafetensorsWriter(
        staging / ADAPTER_WEIGHTS, layout, {"format": "pt"}
    ) as writer:
        for key in writer.order:
            dtype, shape, offset = where[key]
            nbytes = dtype.itemsize * math.prod(shape)
            entry = TensorEntry(key, dtype, shape, spool_path, offset, nbytes)
            writer.write(key, read_tensor(entry, spool))
            total += nbytes
    spool_path.unlink()
    return total


def _adapter_config(
    selection: Union[str, list[str], HFTConfig],
    names: list[str],
    base: Checkpoint,
    diff_dtype: Optional[str],
    records: dict,
) -> HFTConfig:
    settings = {}
    if isinstance(selection, HFTConfig):
        settings = {k: getattr(selection, k) for k in ("ratio", "strategy", "seed", "train_embeddings")}
    config = HFTConfig(
        **settings,
        selected_parameters=names,
        diff_dtype=diff_dtype,
        task_type=task_type_of(base.config()),
        base_model_name_or_path=base.source.name,
        revision=base.source.revision,
        inference_mode=True,
    )
    config.base_fingerprint = make_fingerprint(records, base.source.name, base.source.revision)
    return config


def read_selection_file(path: PathLike) -> list[str]:
    """Parameter names from a text file (one per line, ``#`` comments) or from an adapter_config.json."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        names = json.loads(text).get("selected_parameters")
        if not names:
            raise ValueError(f"{path} has no selected_parameters list.")
        return list(names)
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]
