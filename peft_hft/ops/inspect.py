"""What a saved HFT adapter holds, without loading any model weights (``peft-hft inspect ADAPTER``).

Reads ``adapter_config.json`` and the header of ``adapter_model.safetensors``; when the base checkpoint is available
(locally or in the Hub cache) also its header and ``config.json``, to lay the selection over the model's structure
(built on the meta device), to give the adapter's size as a share of the full model, and, on request, to check the
base against the adapter's fingerprint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..format.checkpoint import Checkpoint, PathLike, meta_model, parameter_aliases
from ..format.encoding import parse_encoding
from ..format.fingerprint import BaseMismatchError, check_fingerprint, combined_digest
from ..format.reader import read_adapter
from ..utils import check_output, dtype_name


@dataclass
class AdapterInfo:
    """Facts about one adapter directory (see :func:`inspect_adapter`)."""

    source: str
    config: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...], int]]  # parameter name -> (dtype, shape, bytes)
    file_bytes: int
    base: Optional[str]
    base_revision: Optional[str]
    base_bytes: Optional[int] = None  # tensor bytes of the full base checkpoint, as stored
    base_parameters: Optional[int] = None
    summary: Optional[str] = None
    base_check: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.tensors.values())

    @property
    def encoding(self) -> str:
        return parse_encoding(self.config.get("diff_encoding")).spec

    @property
    def bytes_per_parameter(self) -> Optional[float]:
        """Stored bytes per trained parameter (4 for fp32 diffs, about 1 for ``"exact"``, 0.53 for ``"int4"``)."""
        params = sum(math.prod(shape) for _, shape, _ in self.tensors.values())
        return self.tensor_bytes / params if params else None

    @property
    def fingerprint(self) -> Optional[dict[str, Any]]:
        return self.config.get("base_fingerprint")

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dtype, _, nbytes in self.tensors.values():
            out[dtype] = out.get(dtype, 0) + nbytes
        return out

    def to_dict(self) -> dict[str, Any]:
        fingerprint = self.fingerprint
        return {
            "adapter": self.source,
            "peft_type": self.config.get("peft_type"),
            "selected_tensors": len(self.tensors),
            "selected_parameters": sum(math.prod(shape) for _, shape, _ in self.tensors.values()),
            "selection": {k: self.config.get(k) for k in ("strategy", "ratio", "seed", "diff_dtype")},
            "encoding": self.encoding,
            "lossless": parse_encoding(self.encoding).lossless,
            "bytes_per_parameter": self.bytes_per_parameter,
            "tensor_bytes": self.tensor_bytes,
            "file_bytes": self.file_bytes,
            "bytes_by_dtype": self.bytes_by_dtype(),
            "base_model": self.base,
            "base_revision": self.base_revision,
            "base_bytes": self.base_bytes,
            "size_ratio": None if not self.base_bytes else self.tensor_bytes / self.base_bytes,
            "base_parameters": self.base_parameters,
            "fingerprint": None if not fingerprint else {
                "algorithm": fingerprint.get("algorithm"),
                "tensors": len(fingerprint.get("tensors", {})),
                "digest": combined_digest(fingerprint),
            },
            "base_check": self.base_check,
            "notes": self.notes,
        }


def inspect_adapter(
    adapter: PathLike, base: Optional[PathLike] = None, verify: bool = False, revision: Optional[str] = None,
    base_revision: Optional[str] = None, plot: Optional[PathLike] = None,
) -> AdapterInfo:
    """Describe an HFT adapter; ``base`` (default: the adapter's ``base_model_name_or_path``) adds the model view."""
    # The strict reader: a damaged adapter (config, header, dtypes, keys, values) is an error, not a report.
    with read_adapter(adapter, revision=revision, load=False) as files:
        pass
    # per trained tensor: the dtype of its main stored tensor, its declared shape, the bytes of all its parts
    tensors = {
        name: (
            dtype_name(files.entries[key].dtype),
            files.shape_of(name),
            sum(files.entries[k].nbytes for k in files.parts.get(name, {"": key}).values()),
        )
        for name, key in files.diffs.items()
    }
    fingerprint = files.config.get("base_fingerprint")
    base_name = str(base) if base is not None else (
        files.config.get("base_model_name_or_path") or (fingerprint or {}).get("base_model")
    )
    if plot is not None:  # the map is the one file inspect writes: never over or around an input
        check_output(plot, overwrite=True, inputs={"ADAPTER": files.directory, "base": base_name})
    info = AdapterInfo(
        files.source.name,
        files.config,
        tensors,
        files.weights_path.stat().st_size,
        base_name,
        (fingerprint or {}).get("revision") or files.config.get("revision"),
    )
    if not fingerprint:
        info.notes.append("no base fingerprint recorded: loading cannot check the base (re-save with peft-hft)")
    checkpoint = None
    if not base_name:
        info.notes.append("the adapter does not name its base model; pass --base DIR for sizes and the map")
    else:
        try:
            checkpoint = Checkpoint.open(base_name, base_revision)
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            info.notes.append(f"base checkpoint not available here ({exc}); pass --base DIR for sizes and the map")
    if checkpoint is not None:
        _describe_base(info, checkpoint, verify, plot)
    elif verify:
        raise FileNotFoundError("--verify needs the base checkpoint; pass --base DIR.")
    return info


def _describe_base(info: AdapterInfo, checkpoint: Checkpoint, verify: bool, plot: Optional[PathLike]) -> None:
    info.base_bytes = checkpoint.total_bytes
    model = meta_model(checkpoint.source.directory)
    if model is not None:
        from ..tuner.summary import format_summary, plot_report, selection_report

        info.base_parameters = sum(p.numel() for p in model.parameters())
        report = selection_report(model, list(info.tensors), "default", info.config.get("layers_pattern"))
        info.summary = format_summary(report)
        if plot is not None:
            plot_report(report, plot)
    if verify:
        fingerprint = info.fingerprint
        if not fingerprint:
            info.base_check = "not possible: the adapter records no base fingerprint"
            return
        aliases = parameter_aliases(model)
        loaders = {}
        for name in fingerprint["tensors"]:
            keys = [k for k in aliases.get(name, [name]) if k in checkpoint.entries]
            loaders[name] = (lambda k=keys[0]: checkpoint.read(k)) if keys else (lambda: None)
        try:
            check_fingerprint(fingerprint, loaders, "The HFT adapter", f"the base checkpoint {checkpoint.source.name}")
            info.base_check = f"OK: all {len(loaders)} base tensors match the fingerprint"
        except BaseMismatchError as exc:
            info.base_check = f"MISMATCH: {exc}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_info(info: AdapterInfo, list_tensors: bool = False) -> str:
    """Human-readable report of :func:`inspect_adapter`."""
    c = info.config
    d = info.to_dict()
    strategy = (
        f"strategy {c.get('strategy')!r}, ratio {c.get('ratio')}, seed {c.get('seed')}"
        if c.get("strategy") else "custom selection"
    )
    by_dtype = ", ".join(f"{_mb(n)} {dtype}" for dtype, n in sorted(info.bytes_by_dtype().items()))
    lines = [
        f"HFT adapter {info.source}",
        f"  selection     {len(info.tensors)} tensors, {d['selected_parameters']:,} parameters ({strategy})",
        f"  diffs         {_mb(info.tensor_bytes)} of tensor data ({by_dtype}); file {_mb(info.file_bytes)} "
        f"(header {info.file_bytes - info.tensor_bytes:,} B)",
        f"  encoding      {info.encoding} ({'lossless' if d['lossless'] else 'lossy'}), "
        f"{info.bytes_per_parameter or 0:.3f} bytes per trained parameter",
    ]
    if info.base_bytes:
        share = f"{100 * info.tensor_bytes / info.base_bytes:.1f}%"
        params = (
            f"; {100 * d['selected_parameters'] / info.base_parameters:.1f}% of its {info.base_parameters:,} parameters"
            if info.base_parameters else ""
        )
        lines.append(f"  size ratio    {share} of the full model ({_mb(info.base_bytes)} as stored){params}")
    revision = f" @ {info.base_revision}" if info.base_revision else ""
    lines.append(f"  base model    {info.base or 'unknown'}{revision}")
    fingerprint = d["fingerprint"]
    if fingerprint:
        lines.append(
            f"  fingerprint   {fingerprint['algorithm']} of {fingerprint['tensors']} base tensors, combined digest "
            f"{fingerprint['digest'][:16]}"
        )
    if info.base_check:
        lines.append(f"  base check    {info.base_check}")
    lines += [f"  note          {note}" for note in info.notes]
    if info.summary:
        lines += ["", info.summary]
    if list_tensors:
        lines += ["", "tensors:"]
        lines += [f"  {name}  {dtype} {list(shape)}  {n:,} B" for name, (dtype, shape, n) in info.tensors.items()]
    return "\n".join(lines)


def format_json(info: AdapterInfo) -> str:
    return json.dumps(info.to_dict(), indent=2)

