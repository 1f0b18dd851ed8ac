"""Checkpoints on disk, one tensor at a time: the file layer under ``peft-hft merge``, ``diff`` and ``inspect``.

Merging an adapter into a 70B model must not need 140 GB of RAM. This module reads safetensors files (single or
sharded with a ``model.safetensors.index.json``) by parsing their headers and reading each tensor's bytes on demand,
and writes safetensors files tensor by tensor (header first, then the data in order), so a command holds about one
tensor in memory at a time. Everything is written into a hidden temporary directory beside the destination and
renamed into place at the end (:func:`atomic_directory`), so an interrupted command leaves no half-written output.

Sources may be local directories or Hugging Face Hub repo ids; ids are resolved through ``huggingface_hub``'s cache
(offline with ``HF_HUB_OFFLINE=1`` when the files are cached).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from ..utils import PathLike
from .keys import INDEX_NAME, SINGLE_NAME

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# What a model checkpoint needs from a Hub repo: safetensors weights, configs and tokenizer files (no .bin duplicates,
# no ONNX/GGUF exports, no remote code).
MODEL_FILES = (
    "*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "vocab*", "merges*"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: object) -> bool:
    """True for a Hugging Face Hub repo id (``owner/name``) that is not an existing local path."""
    return bool(name) and not os.path.exists(str(name)) and _REPO_ID.match(str(name)) is not None


def _check_byte_order() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("peft-hft's checkpoint streaming needs a little-endian machine (safetensors byte order).")


# ------------------------------------------------------------------------------------------------------------------
# Resolving sources
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A local directory holding a checkpoint or adapter, and where it came from."""

    directory: Path
    name: str  # what the user gave (path or repo id)
    repo_id: Optional[str] = None
    revision: Optional[str] = None  # commit hash of a Hub snapshot


def resolve(name_or_path: PathLike, what: str, revision: Optional[str] = None,
            allow_patterns: Optional[Sequence[str]] = None) -> Source:
    """A local directory, or a Hub repo id downloaded (or taken from the cache) with ``huggingface_hub``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return Source(path.resolve(), str(name_or_path))
    if path.exists():
        raise NotADirectoryError(f"{what} {str(name_or_path)!r} is a file; pass the directory that holds it.")
    name = str(name_or_path)
    if not is_repo_id(name):
        raise FileNotFoundError(
            f"{what} {name!r} is neither a local directory nor a Hugging Face Hub repo id ('owner/name')."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        directory = Path(snapshot_download(name, revision=revision, allow_patterns=list(allow_patterns or ["*"])))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        raise FileNotFoundError(
            f"{what} {name!r} is not a local directory and could not be fetched from the Hugging Face Hub ({exc}). "
            "Fix: pass a local directory, or download it first (it is then read from the cache, also offline)."
        ) from exc
    commit = directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return Source(directory, name, repo_id=name, revision=commit)


# ------------------------------------------------------------------------------------------------------------------
# Reading safetensors files lazily
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (from its header; no data read)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header: ``({key: TensorEntry}, metadata)``; raises a clear ``ValueError`` for a broken file.

    Checked before any tensor is read: the header is a JSON object of well-formed entries, every tensor's byte range
    matches its dtype and shape and lies inside the file, and no two ranges overlap (the safetensors format's rules).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(100_000_000, max(0, size - 8)):
                raise ValueError(f"header length {length} does not fit in the file of {size} bytes")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, RecursionError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt.") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: the safetensors '__metadata__' must map strings to strings.")
    entries = {}
    for key, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise ValueError(f"{path}: the header entry of tensor {key!r} is malformed ({problem}); it is corrupt.")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which peft-hft cannot process.")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if end - begin != _numel(info["shape"]) * dtype.itemsize:
            raise ValueError(
                f"{path}: tensor {key} claims {end - begin} bytes, but shape {info['shape']} of {info['dtype']} needs "
                f"{_numel(info['shape']) * dtype.itemsize}; the file is corrupt."
            )
        if 8 + length + end > size:
            raise ValueError(f"{path}: tensor {key} lies outside the file ({size} bytes); the file is truncated.")
        entries[key] = TensorEntry(key, dtype, tuple(info["shape"]), path, 8 + length + begin, end - begin)
    ordered = sorted(entries.values(), key=lambda e: e.start)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.start + before.nbytes > after.start:
            raise ValueError(f"{path}: tensors {before.key} and {after.key} overlap; the file is corrupt.")
    return entries, metadata


def _entry_problem(info: Any) -> Optional[str]:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict):
        return "not an object"
    if not isinstance(info.get("dtype"), str):
        return "no dtype"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(integer(s) for s in shape):
        return "shape is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(integer(o) for o in offsets):
        return "data_offsets is not [begin, end]"
    if offsets[1] < offsets[0]:
        return "data_offsets end before they begin"
    return None


def read_tensor(entry: TensorEntry, handle: Optional[BinaryIO] = None) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor (exactly one copy in memory, no memory map).

    The file is read straight into the tensor's uninitialised memory: a zero-filled buffer would touch every page
    twice, which costs as much as the read itself on large tensors. No transparent huge pages are asked for: where the
    kernel compacts memory for them on the first touch (``defrag`` set to ``madvise``, the common default), a first
    load in a new process measured 0.23 s slower with them (``benchmarks/bench_load_time.py``, 310 MB of fp32 diffs,
    2-core Intel Xeon VM with AMX)."""
    _check_byte_order()
    tensor = torch.empty(entry.shape, dtype=entry.dtype)  # read_header matched nbytes to the shape and dtype
    if not entry.nbytes:
        return tensor
    with contextlib.nullcontext(handle) if handle is not None else open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != entry.nbytes:
            raise ValueError(f"{entry.file} is truncated: tensor {entry.key} is incomplete.")
    return tensor


class MappedFile:
    """An open safetensors file mapped copy-on-write, from which tensors are copied into memory of their own.

    Why: ``readinto`` (:func:`read_tensor`) is one kernel copy on one core that takes the page faults of the new
    memory inside it; copying out of a mapping of the page cache runs through torch's copy on every core. First
    loads in new processes of the 310 MB fp32 SmolLM2 adapter took 0.16-0.19 s this way against 0.23-0.25 s with
    ``readinto`` (2-core AMD EPYC VM; docs/benchmarks.md, "Load time"). The returned tensors alias nothing: what the
    reader validates is what its caller gets, whatever later happens to the file. The mapping is private, so nothing
    is ever written to the file.

    The open handle is mapped, not the path, so the bytes stay those of the file the caller opened even if the path
    is replaced meanwhile; a file shorter than the header's entries need is refused before anything is mapped. A
    file truncated *while* it is mapped makes the reading process fail with SIGBUS, as every memory-mapped reader of
    safetensors files does (``safetensors`` itself, PEFT's loader); peft-hft's own writers never truncate, and they
    replace files by renaming.
    """

    def __init__(self, handle: BinaryIO, entries: Iterable[TensorEntry]) -> None:
        _check_byte_order()
        size = os.fstat(handle.fileno()).st_size
        needed = max((e.start + e.nbytes for e in entries), default=0)
        if size < needed:
            raise ValueError(f"{handle.name} is truncated: it holds {size} bytes, its header needs {needed}.")
        self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor ``entry`` describes, in new memory."""
        tensor = torch.empty(entry.shape, dtype=entry.dtype)  # read_header matched nbytes to the shape and dtype
        if entry.nbytes:
            tensor.view(-1).view(torch.uint8).copy_(self._bytes[entry.start : entry.start + entry.nbytes])
        return tensor

    def close(self) -> None:
        del self._bytes  # the mapping can only be closed once no tensor views it
        self._map.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Checkpoint:
    """A safetensors model checkpoint: one ``model.safetensors`` or shards listed in an index."""

    source: Source
    shards: list[Path]
    entries: dict[str, TensorEntry]
    metadata: dict[Path, dict[str, str]]
    index: Optional[dict[str, Any]] = None

    @classmethod
    def open(cls, name_or_path: PathLike, revision: Optional[str] = None, what: str = "BASE") -> Checkpoint:
        source = resolve(name_or_path, what, revision, allow_patterns=MODEL_FILES)
        directory = source.directory
        index_path = directory / INDEX_NAME
        index = None
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            shard_names = list(dict.fromkeys(index["weight_map"].values()))
            shards = [directory / name for name in sorted(shard_names)]
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{what} {source.name}: the index lists shards that are missing: {missing}.")
        elif (directory / SINGLE_NAME).is_file():
            shards = [directory / SINGLE_NAME]
        else:
            others = sorted(p.name for p in directory.glob("*.safetensors"))
            if len(others) == 1:
                shards = [directory / others[0]]
            else:
                legacy = sorted(p.name for pattern in ("*.bin", "*.pt") for p in directory.glob(pattern))
                hint = (
                    f" It holds {', '.join(legacy)}: convert it with `AutoModelForCausalLM.from_pretrained(...)"
                    ".save_pretrained(out)` (safetensors)."
                    if legacy
                    else ""
                )
                raise FileNotFoundError(
                    f"{what} {source.name} holds no safetensors checkpoint (model.safetensors or "
                    f"{INDEX_NAME}).{hint}"
                )
        entries: dict[str, TensorEntry] = {}
        metadata: dict[Path, dict[str, str]] = {}
        for shard in shards:
            shard_entries, shard_metadata = read_header(shard)
            duplicated = sorted(set(shard_entries) & set(entries))
            if duplicated:
                raise ValueError(f"{what} {source.name}: tensors stored twice across shards: {duplicated[:5]}.")
            entries.update(shard_entries)
            metadata[shard] = shard_metadata
        return cls(source, shards, entries, metadata, index)

    def shard_entries(self, shard: Path) -> list[TensorEntry]:
        return sorted((e for e in self.entries.values() if e.file == shard), key=lambda e: e.start)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def largest_shard_bytes(self) -> int:
        return max((sum(e.nbytes for e in self.shard_entries(s)) for s in self.shards), default=0)

    def config(self) -> Optional[dict[str, Any]]:
        path = self.source.directory / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def read(self, key: str) -> torch.Tensor:
        return read_tensor(self.entries[key])


# ------------------------------------------------------------------------------------------------------------------
# Model structure without weights: parameter aliases (tied weights) and selections
# ------------------------------------------------------------------------------------------------------------------


def meta_model(directory: Path) -> Optional[torch.nn.Module]:
    """The model of ``directory/config.json`` built on the meta device (no memory, no weights), or ``None``.

    Only architectures that ship with transformers are built; configs that need remote code are not executed.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    import transformers
    from transformers import AutoConfig

    raw = json.loads(config_path.read_text())
    if raw.get("auto_map"):
        return None
    try:
        config = AutoConfig.from_pretrained(str(directory))
        architectures = getattr(config, "architectures", None) or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        if model_cls is None:
            from transformers import AutoModelForCausalLM

            model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
        if model_cls is None:
            return None
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return model_cls(config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError, OSError) as exc:
        # An unknown or broken config: fall back to the names in the checkpoint, and say what that costs.
        warnings.warn(
            f"Could not build the model described by {config_path} ({type(exc).__name__}: {exc}); tied weights are "
            "recognised only by the names stored in the checkpoint. If the merged or extracted output misses a tied "
            "tensor, fix the config (or install the transformers version the model needs).",
            stacklevel=2,
        )
        return None


def parameter_aliases(model: Optional[torch.nn.Module]) -> dict[str, list[str]]:
    """``canonical parameter name -> every name it is stored under`` (tied weights have several)."""
    if model is None:
        return {}
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(canonical[id(param)], []).append(name)
    return aliases


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class SafetensorsWriter:
    """Write a safetensors file one tensor at a time: the header is laid out first from ``(key, dtype, shape)``.

    Tensors are laid out like ``safetensors.torch.save_file`` does (widest dtype first, then by name), so every tensor
    is aligned for zero-copy loading; :meth:`write` must be called in :attr:`order`.
    """

    path: Path
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]]
    metadata: Optional[dict[str, str]] = None
    order: list[str] = field(init=False)
    _file: Optional[BinaryIO] = field(init=False, default=None)
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        _check_byte_order()
        ordered = sorted(self.layout, key=lambda item: (-item[1].itemsize, item[0]))
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = dict(self.metadata)
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for key, dtype, shape in ordered:
            nbytes = dtype.itemsize * _numel(shape)
            header[key] = {
                "dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]
            }
            self._expected.append((key, dtype, tuple(shape), nbytes))
            offset += nbytes
        self.order = [key for key, *_ in ordered]
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        name, dtype, shape, nbytes = self._expected[self._next]
        if key != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"SafetensorsWriter({self.path.name}): expected {name} {dtype} {shape}, got {key} {tensor.dtype} "
                f"{tuple(tensor.shape)}."
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if nbytes:
            self._file.write(flat.view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        if self._file is None:
            return
        complete = self._next == len(self._expected)
        self._file.close()
        self._file = None
        if not complete:
            raise RuntimeError(f"{self.path} was closed after {self._next} of {len(self._expected)} tensors.")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._file is not None:
            self._file.close()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
