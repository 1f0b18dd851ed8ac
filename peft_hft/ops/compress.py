"""Re-encode a saved HFT adapter (``peft-hft compress IN OUT --encoding ...``), losslessly or lossily.

An adapter saved before the compact encodings existed, or saved with plain float diffs to keep its fp32 masters, can
be turned into any encoding of :mod:`peft_hft.format.encoding` without loading a model: the adapter is read with the
strict reader (every tensor checked once, as it is re-encoded), one diff at a time, and written atomically. Encodings
that count from the base (``"exact"``, and any encoding of an ``"exact"`` adapter) need the base checkpoint
(``--base``); its tensors are read one at a time in the dtype the adapter's fingerprint records (the dtype the
adapter was trained in), so ``"exact"`` from fp32 diffs of a bf16 training run gives the trained bf16 weights.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..format.checkpoint import Checkpoint, PathLike
from ..format.encoding import apply_diff, parse_encoding
from ..format.keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, part_key
from ..format.reader import AdapterFile, read_adapter
from ..utils import atomic_directory, torch_dtype


@dataclass(frozen=True)
class CompressResult:
    output: Path
    encoding: str
    tensors: int
    parameters: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")


def compress_adapter(
    adapter: PathLike,
    output: PathLike,
    encoding: str,
    *,
    base: Optional[PathLike] = None,
    overwrite: bool = False,
    progress: bool = True,
    adapter_revision: Optional[str] = None,
    base_revision: Optional[str] = None,
) -> CompressResult:
    """Write ``adapter`` re-encoded as ``encoding`` to ``output`` (see the module docstring).

    Raises:
        ValueError: an unknown encoding, a base that is needed but not given or lacks a tensor, an output that
            overlaps an input (nothing is written).
    """
    target = parse_encoding(encoding)
    with read_adapter(adapter, revision=adapter_revision, load=False, check_values=False) as source:
        needs_base = target.kind == "exact" or source.encoding.kind == "exact"
        if needs_base and base is None:
            raise ValueError(
                f"Encoding {source.encoding.spec!r} -> {target.spec!r} counts steps from the base model's values, "
                "so it needs the base checkpoint. Fix: pass --base DIR (the model the adapter was trained on)."
            )
        if source.full and target.kind != "float":
            raise ValueError(
                f"The adapter {source.source.name} also holds tuned tensors in full (an extended vocabulary); those "
                "are kept as they are only by the 'float' encoding. Fix: compress it with --encoding float."
            )
        checkpoint = Checkpoint.open(base, base_revision) if base is not None else None
        inputs = {"ADAPTER directory": source.directory}
        if checkpoint is not None:
            inputs["BASE directory"] = checkpoint.source.directory
        with atomic_directory(output, overwrite=overwrite, inputs=inputs) as staging:
            tensors = _encode_all(source, checkpoint, target, progress)
            config = dict(source.config)
            config["diff_encoding"] = target.spec
            if target.kind != "float":
                config["diff_dtype"] = None
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for path in sorted(source.directory.iterdir()):  # the model card and anything else beside the adapter
                if path.is_file() and path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    shutil.copyfile(path, staging / path.name)
            after = sum(t.numel() * t.element_size() for t in tensors.values())
        return CompressResult(
            Path(output).expanduser().absolute(), target.spec, len(source.diffs),
            sum(math.prod(source.shape_of(n)) for n in source.diffs), source.stored_bytes(), after,
        )


def base_tensor(source: AdapterFile, checkpoint: Optional[Checkpoint], name: str) -> Optional[torch.Tensor]:
    """The base value of ``name`` from ``checkpoint`` (None without one), checked against the adapter's shape and in
    the dtype its fingerprint records: what decoding an ``"exact"`` adapter counts its steps from."""
    if checkpoint is None:
        return None
    if name not in checkpoint.entries:
        raise ValueError(
            f"The base checkpoint {checkpoint.source.name} stores no tensor {name!r}, which the adapter modifies. Fix: "
            "pass the base the adapter was made for."
        )
    tensor = checkpoint.read(name)
    if tuple(tensor.shape) != source.shape_of(name):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} in {checkpoint.source.name} but {source.shape_of(name)} in the "
            "adapter. Fix: pass the base the adapter was made for."
        )
    record = ((source.config.get("base_fingerprint") or {}).get("tensors") or {}).get(name)
    return tensor.to(torch_dtype(record["dtype"], "base_fingerprint")) if record else tensor


def _encode_all(source: AdapterFile, checkpoint: Optional[Checkpoint], target, progress: bool
                ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in tqdm(list(source.diffs), desc=f"Encoding ({target.spec})", disable=not progress):
        base = base_tensor(source, checkpoint, name)
        if target.kind == "float":
            parts = {"": source.diff(name, base, check=True).contiguous()}
        else:
            diff = source.diff(name, base, check=True).float()
            reference = base if base is not None else torch.empty(source.shape_of(name), device="meta")
            tuned = apply_diff(base, diff, base.dtype) if base is not None else diff
            parts = target.encode(name, reference, tuned, diff)
        for part, tensor in parts.items():
            out[part_key(name, part)] = tensor.contiguous()
    for key in source.full.values():
        out[key] = source.read(key)
    return out
