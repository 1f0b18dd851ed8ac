"""Streaming merge: apply an HFT diff adapter to a base checkpoint on disk, shard by shard (``peft-hft merge``).

``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` needs the whole model in memory. An HFT adapter is a
set of ``tuned - base`` tensors keyed by parameter name, so merging is a per-tensor operation on the checkpoint files:
read a base tensor, add its diff, write it out. This module does that with about one tensor in memory at a time, and
writes the result atomically (see :mod:`peft_hft.format.checkpoint`).

The result equals loading the base with ``from_pretrained(base, dtype=<output dtype>)``, applying the adapter,
``merge_and_unload()`` and ``save_pretrained()``, tensor for tensor: each merged value is
``(base.to(dtype).float() + diff.float()).to(dtype)``, exactly as the HFT ledger computes it (both call
:func:`peft_hft.format.encoding.apply_diff`; encoded diffs are decoded against each streamed base tensor). Tensors
the adapter does not touch are copied (cast when ``dtype`` is given). Tied weights are handled through the model's
own tying (built on the meta device from ``config.json``): a diff of ``model.embed_tokens.weight`` also applies to
``lm_head.weight`` when the checkpoint stores both; a tied checkpoint that stores only one of them gets the diff once.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
from ..format.encoding import apply_diff
from ..format.fingerprint import (
    BaseMismatchError,
    Mismatch,
    base_check_skipped,
    compare,
    describe_base,
    mismatch_error,
    record_algorithm,
)
from ..format.keys import INDEX_NAME
from ..format.reader import AdapterFile, read_adapter
from ..utils import FLOAT_DTYPES, atomic_directory, check_output, float_dtype, listing, refuse_output_overlap

# Files of a model directory that are weights (rewritten or dropped), not configuration to copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {INDEX_NAME, "README.md", ".gitattributes"}
OUTPUT_DTYPES = FLOAT_DTYPES


@dataclass(frozen=True)
class MergeResult:
    output: Path
    merged_parameters: tuple[str, ...]
    shards: int
    bytes_written: int
    verified: bool
    base_check: str  # what was checked, in words


def output_dtype(entry: TensorEntry, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype


def _targets(
    checkpoint: Checkpoint, diffs: dict[str, TensorEntry], aliases: dict[str, list[str]]
) -> dict[str, str]:
    """``checkpoint key -> parameter name`` for every stored tensor a diff applies to; raises for missing ones."""
    to_canonical = {alias: canonical for canonical, names in aliases.items() for alias in names}
    targets: dict[str, str] = {}
    missing = []
    for name in diffs:
        canonical = to_canonical.get(name, name)
        keys = [k for k in aliases.get(canonical, [name]) if k in checkpoint.entries]
        if not keys:
            missing.append(name)
        targets.update(dict.fromkeys(keys, name))
    if missing:
        raise ValueError(
            f"The base checkpoint {checkpoint.source.name} stores no tensor for {len(missing)} diff(s) of the adapter: "
            f"{listing(missing)}. The adapter was made for another architecture, or this checkpoint stores the "
            "model in another layout than the loaded model (transformers converts some layouts, e.g. MoE experts, "
            "on load). Fix: pass the base the adapter was made for, or merge in memory with "
            "PeftModel.from_pretrained(...)"
            ".merge_and_unload()."
        )
    return targets


def _check_shapes(
    checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]], targets: dict[str, str], fingerprint: Optional[dict]
) -> None:
    """Compare shapes from the headers alone (the declared shapes of encoded diffs), before anything is read."""
    problems = [
        f"  - {key}: {checkpoint.entries[key].shape} in the checkpoint vs {shapes[name]} in the adapter"
        for key, name in targets.items()
        if tuple(shapes[name]) != tuple(checkpoint.entries[key].shape)
    ]
    if problems:
        base = describe_base(fingerprint) if fingerprint else "another base model"
        raise BaseMismatchError(
            f"The HFT adapter was made for {base}: {len(problems)} of the base tensors it modifies have other shapes "
            f"in {checkpoint.source.name} (a resized vocabulary or another architecture):\n" + "\n".join(problems[:10])
            + "\nDiffs of another shape cannot be applied. Fix: pass the base checkpoint the adapter was made for."
        )


def merge_checkpoint(
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    *,
    dtype: Optional[str] = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    base_revision: Optional[str] = None,
    adapter_revision: Optional[str] = None,
) -> MergeResult:
    """Write ``base + adapter`` to ``output`` shard by shard, with about one tensor in memory at a time.

    Args:
        base: Directory (or Hub repo id) of the base model's safetensors checkpoint, sharded or single.
        adapter: Directory (or Hub repo id) of an HFT adapter.
        output: Directory to create; it appears only when the merge has succeeded.
        dtype: Output dtype of the floating-point tensors (default: as stored in the base checkpoint).
        verify: Check the base against the adapter's base fingerprint (unless ``PEFT_HFT_SKIP_BASE_CHECK`` is set).
        overwrite: Replace ``output`` if it exists (only once the new output is complete).
        progress: Show a progress bar.

    Raises:
        BaseMismatchError: the base is not the one the adapter was made for (nothing is written).
        ValueError / FileNotFoundError / FileExistsError: bad inputs, with the fix in the message.
    """
    check_output(output, overwrite, {"BASE": base, "ADAPTER": adapter})  # before anything is read
    out_dtype = float_dtype(dtype, "dtype (None keeps the stored dtypes)")
    # Values are checked while merging (each diff is read once; a NaN/Inf stops the merge before anything appears).
    with read_adapter(adapter, revision=adapter_revision, load=False, check_values=False) as adapter_file:
        return _merge(adapter_file, base, output, out_dtype, dtype, verify, overwrite, progress, base_revision)


def _merge(adapter_file: AdapterFile, base: PathLike, output: PathLike, out_dtype: Optional[torch.dtype],
           dtype: Optional[str], verify: bool, overwrite: bool, progress: bool,
           base_revision: Optional[str]) -> MergeResult:
    if adapter_file.full:
        raise ValueError(
            f"The adapter {adapter_file.source.name} also holds tuned tensors in full "
            f"({listing(sorted(adapter_file.full))}), saved because the vocabulary was extended before training; a "
            "base checkpoint on disk has the old vocabulary. Fix: merge in memory: resize the base's embeddings, "
            "then PeftModel.from_pretrained(...).merge_and_unload()."
        )
    diffs = {name: adapter_file.entries[key] for name, key in adapter_file.diffs.items()}
    shapes = {name: adapter_file.shape_of(name) for name in diffs}
    encoding = adapter_file.encoding
    checkpoint = Checkpoint.open(base, base_revision)
    inputs = {"BASE directory": checkpoint.source.directory, "ADAPTER directory": adapter_file.directory}
    refuse_output_overlap(output, inputs)
    fingerprint = adapter_file.config.get("base_fingerprint") if verify and not base_check_skipped() else None
    targets = _targets(checkpoint, diffs, parameter_aliases(meta_model(checkpoint.source.directory)))
    _check_shapes(checkpoint, shapes, targets, fingerprint)

    records = (fingerprint or {}).get("tensors", {})
    algorithm = record_algorithm(fingerprint) if fingerprint else None
    mismatches: list[Mismatch] = []
    verified: set[str] = set()
    written = 0
    bar = tqdm(total=checkpoint.total_bytes, unit="B", unit_scale=True, desc="Merging", disable=not progress)
    with atomic_directory(output, overwrite=overwrite, inputs=inputs) as staging, bar:
        for shard in checkpoint.shards:
            bar.set_postfix_str(shard.name)
            entries = {e.key: e for e in checkpoint.shard_entries(shard)}
            layout = [(key, output_dtype(e, out_dtype), e.shape) for key, e in entries.items()]
            with open(shard, "rb") as source, SafetensorsWriter(
                staging / shard.name, layout, checkpoint.metadata[shard]
            ) as writer:
                for key in writer.order:
                    entry = entries[key]
                    tensor = read_tensor(entry, source)
                    target = output_dtype(entry, out_dtype)
                    name = targets.get(key)
                    if name is not None:
                        if name in records and name not in verified:
                            reason = compare(tensor, records[name], algorithm)
                            if reason is not None:
                                mismatches.append(Mismatch(name, reason))
                            verified.add(name)
                        # each diff is read and checked once, here, and decoded against the streamed base tensor
                        parts = adapter_file.read_parts(name, check=True)
                        if encoding.kind == "float":
                            tensor = apply_diff(tensor, parts[""], target, consume=True)
                        else:
                            tensor = encoding.value(parts, adapter_file.shape_of(name), tensor, target)
                        del parts
                    elif tensor.dtype != target:
                        tensor = tensor.to(target)
                    writer.write(key, tensor)
                    written += tensor.numel() * tensor.element_size()
                    bar.update(entry.nbytes)
                    del tensor
            if mismatches:
                raise mismatch_error(
                    mismatches, len(records), fingerprint, f"The HFT adapter {adapter_file.source.name}",
                    f"the base checkpoint {checkpoint.source.name} (stopped after shard {shard.name}; nothing was "
                    "written)",
                )
        _write_index(checkpoint, staging, written)
        _copy_model_files(checkpoint.source.directory, staging, dtype)
    if fingerprint is not None:
        check = f"base verified against the adapter's fingerprint ({len(verified)} tensors)"
    elif not verify or base_check_skipped():
        check = "base check skipped"
    else:
        check = "base NOT verified: the adapter records no base fingerprint"
    return MergeResult(
        Path(output).expanduser().absolute(), tuple(diffs), len(checkpoint.shards), written,
        verified=fingerprint is not None, base_check=check,
    )


def _write_index(checkpoint: Checkpoint, staging: Path, total_size: int) -> None:
    if checkpoint.index is None:
        return
    index: dict[str, Any] = json.loads(json.dumps(checkpoint.index))
    index.setdefault("metadata", {})["total_size"] = total_size
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_model_files(source: Path, staging: Path, dtype: Optional[str]) -> None:
    """Copy configuration, tokenizer and generation files (not weights, not the base's README)."""
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(path, staging / path.name)  # follows Hub-cache symlinks
    config_path = staging / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
