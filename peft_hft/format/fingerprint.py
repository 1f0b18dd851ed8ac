"""Fingerprints of the base tensors an HFT adapter modifies, and the check that an adapter meets its own base.

An HFT adapter stores ``tuned - base`` for the tensors it trained. Added to any other base (another revision, a resized
vocabulary, a re-quantised copy), those diffs give a model that loads without error and is silently wrong. So every
saved adapter records, in ``adapter_config.json`` (``HFTConfig.base_fingerprint``), the base it belongs to: the base
model's id and revision when known, and a 128-bit digest (XXH3) of every base tensor it modifies. Loading
(``PeftModel.from_pretrained``, ``load_adapter``, ``AutoPeftModel*``) and ``peft-hft merge`` compare the base at hand
with that record and refuse a mismatch with an error that lists the differing tensors.

Dtype rule. Bases are often loaded in another dtype than the one they were trained in (an fp32 checkpoint loaded in
bf16 for inference). A digest is taken of the raw bytes in one dtype, so the record holds, for each tensor, the digest
in the tensor's own dtype plus the digests of the tensor rounded (round-to-nearest-even, as ``tensor.to(dtype)`` and
``from_pretrained(dtype=...)`` do) to every coarser float dtype. A base matches when, compared at the coarser of the
two dtypes, the values are bit-identical:

* same dtype: the raw bytes must be identical;
* the base here is coarser (record fp32, model bf16/fp16): the model's bytes must equal the recorded rounding;
* the base here is finer (record bf16, model fp32): the model's tensor rounded to the recorded dtype must match.

bf16 and fp16 are not comparable with each other (neither rounds exactly to the other), so such a pair is reported
as a mismatch that names the dtypes; load the base in float32 or in the recorded dtype.

Opting out (for a base you know to be equivalent, e.g. re-saved with tiny numeric changes): wrap the load in
``with peft_hft.skip_base_check(): ...`` or set the environment variable ``PEFT_HFT_SKIP_BASE_CHECK=1``; the CLI has
``--no-verify``.

Digest. The record exists to catch mistakes (a wrong base, revision or vocabulary), not a malicious author, who writes
the record as well as the diffs (docs/security.md); so it needs a digest that no accidental difference collides with,
not a cryptographic one. Format 2, what is written now, uses XXH3-128, which hashes at memory speed (13 GB/s
on one core of a Xeon VM, against 1.5 GB/s for SHA-256 with the SHA extensions): at 8B the base check of a default
adapter hashes about 9 GB, seconds with SHA-256 on every load. Records of format 1 (SHA-256) are still read and
checked with SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch
import xxhash
from tqdm.auto import tqdm

from ..utils import OptOut, dtype_name, torch_dtype

FINGERPRINT_FORMAT = 2
ALGORITHM = "xxh3_128"
# digest algorithm -> (hash constructor, hex digits); every format's algorithm, so older records still verify
_ALGORITHMS: dict[str, tuple[Callable[[], Any], int]] = {
    "sha256": (hashlib.sha256, 64),
    "xxh3_128": (xxhash.xxh3_128, 32),
}
# the algorithm each format wrote
_FORMAT_ALGORITHM = {1: "sha256", 2: "xxh3_128"}
SKIP_ENV = "PEFT_HFT_SKIP_BASE_CHECK"
# Float dtypes a base may be rounded to, finest first.
ROUNDINGS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_LISTED = 10

_skip = OptOut("peft_hft_skip_base_check", SKIP_ENV)


class BaseMismatchError(ValueError):
    """An HFT adapter was loaded or merged onto a base other than the one it was made for."""


@contextlib.contextmanager
def skip_base_check() -> Iterator[None]:
    """Load or merge HFT adapters inside this block without checking that the base is the one they were made for.

    Example:
        ```py
        >>> with peft_hft.skip_base_check():
        ...     model = PeftModel.from_pretrained(other_base, "user/hft-adapter")
        ```
    """
    with _skip.block():
        yield


def base_check_skipped() -> bool:
    """True inside :func:`skip_base_check` or when ``PEFT_HFT_SKIP_BASE_CHECK`` is set to 1/true/yes."""
    return _skip.active()


# ------------------------------------------------------------------------------------------------------------------
# Digests
# ------------------------------------------------------------------------------------------------------------------


def digest(tensor: torch.Tensor, algorithm: str = ALGORITHM) -> str:
    """The hex digest (XXH3-128 unless ``algorithm`` says ``"sha256"``) of a tensor's raw bytes (row-major,
    little-endian, in its own dtype), whatever its device or layout."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    h = _ALGORITHMS[algorithm][0]()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())  # both release the GIL on large buffers
    return h.hexdigest()


def record_algorithm(fingerprint: Mapping[str, Any]) -> str:
    """The digest algorithm of a (validated) base fingerprint: its ``algorithm``, else its format's."""
    return fingerprint.get("algorithm", _FORMAT_ALGORITHM[fingerprint.get("format", FINGERPRINT_FORMAT)])


def tensor_fingerprint(tensor: torch.Tensor) -> dict[str, Any]:
    """The record of one base tensor: dtype, shape, digest, and digests of its roundings to coarser float dtypes."""
    record: dict[str, Any] = {
        "dtype": dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        ALGORITHM: digest(tensor),
    }
    if tensor.is_floating_point():
        coarser = [d for d in ROUNDINGS if d != tensor.dtype and d.itemsize < tensor.dtype.itemsize]
        if coarser:
            record["rounded"] = {dtype_name(d): digest(tensor.to(d)) for d in coarser}
    return record


# Originals never change in place, so their records are cached by tensor identity (a dtype change of the model
# replaces the ledger's stored tensor and thereby invalidates the entry). Keyed by id() with a liveness check: tensors
# cannot be dict keys of a WeakKeyDictionary (their == is elementwise).
_cache: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def _cached_fingerprint(tensor: torch.Tensor) -> dict[str, Any]:
    key = id(tensor)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is tensor:
        return hit[1]
    record = tensor_fingerprint(tensor)
    _cache[key] = (weakref.ref(tensor, lambda _, key=key: _cache.pop(key, None)), record)
    return record


def fingerprint_tensors(
    tensors: Mapping[str, Callable[[], torch.Tensor]], cache: bool = False, desc: str = "Fingerprinting base tensors"
) -> dict[str, dict[str, Any]]:
    """Records of many tensors (given as zero-argument loaders), hashed in parallel threads."""
    work = _cached_fingerprint if cache else tensor_fingerprint
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(lambda load=load: work(load())) for name, load in tensors.items()}
        return {name: future.result() for name, future in tqdm(futures.items(), desc=desc, disable=len(futures) < 64)}


# ------------------------------------------------------------------------------------------------------------------
# Comparing a base with a record
# ------------------------------------------------------------------------------------------------------------------


def compare(tensor: torch.Tensor, record: Mapping[str, Any], algorithm: str = ALGORITHM) -> Optional[str]:
    """``None`` if ``tensor`` is the recorded base tensor (see the module docstring's dtype rule), else the reason;
    ``algorithm`` is the record's (:func:`record_algorithm`)."""
    shape = tuple(record.get("shape", ()))
    if tuple(tensor.shape) != shape:
        return f"shape {tuple(tensor.shape)} here vs {shape} in the adapter's base"
    recorded = torch_dtype(record["dtype"], "an HFT base fingerprint")
    here = tensor.dtype
    if here == recorded:
        expected, got = record[algorithm], digest(tensor, algorithm)
    elif dtype_name(here) in record.get("rounded", {}):
        expected, got = record["rounded"][dtype_name(here)], digest(tensor, algorithm)
    elif here.is_floating_point and here.itemsize > recorded.itemsize:
        expected, got = record[algorithm], digest(tensor.to(recorded), algorithm)
    else:
        return (
            f"dtype {dtype_name(here)} here cannot be compared with the recorded {record['dtype']} (neither rounds "
            f"exactly to the other); load the base in {record['dtype']} or float32"
        )
    if got != expected:
        return f"different values ({algorithm} {got[:12]}... here vs {expected[:12]}... recorded)"
    return None


@dataclass(frozen=True)
class Mismatch:
    name: str
    reason: str


def describe_base(fingerprint: Mapping[str, Any]) -> str:
    base = fingerprint.get("base_model")
    revision = fingerprint.get("revision")
    if not base:
        return "an unnamed base model"
    return f"{base!r}" + (f" at revision {revision}" if revision else "")


def mismatch_error(
    mismatches: list[Mismatch], total: int, fingerprint: Mapping[str, Any], subject: str, where: str = "this model"
) -> BaseMismatchError:
    """The error for a failed base check; lists the first mismatching tensors and the ways out."""
    lines = [f"  - {m.name}: {m.reason}" for m in mismatches[:_MAX_LISTED]]
    if len(mismatches) > _MAX_LISTED:
        lines.append(f"  ... and {len(mismatches) - _MAX_LISTED} more")
    base = fingerprint.get("base_model")
    revision = fingerprint.get("revision")
    load_hint = (
        f" (e.g. from_pretrained({base!r}" + (f", revision={revision!r}" if revision else "") + "))" if base else ""
    )
    return BaseMismatchError(
        f"{subject} was made for {describe_base(fingerprint)}, but {len(mismatches)} of the {total} base tensors it "
        f"modifies differ in {where}:\n" + "\n".join(lines) + "\n"
        "Adding its diffs to another base gives a silently wrong model. Fix: use the base model the adapter was made "
        f"for{load_hint}. If the difference is intended, skip this check: wrap the call in "
        f"`with peft_hft.skip_base_check():`, set {SKIP_ENV}=1, or pass --no-verify to the peft-hft CLI."
    )


def check_fingerprint(
    fingerprint: Optional[Mapping[str, Any]],
    tensors: Mapping[str, Callable[[], Optional[torch.Tensor]]],
    subject: str,
    where: str = "this model",
) -> None:
    """Compare recorded base tensors with the ones at hand (loaders returning ``None`` for absent tensors).

    Raises:
        BaseMismatchError: listing every tensor whose shape, dtype or values differ, or that is absent.
    """
    validate_fingerprint(fingerprint)
    records = fingerprint["tensors"]
    algorithm = record_algorithm(fingerprint)
    unknown = [name for name in records if name not in tensors]
    reasons: dict[str, Optional[str]] = {name: "not found" for name in unknown}

    def check(name: str) -> Optional[str]:
        tensor = tensors[name]()
        return "not found" if tensor is None else compare(tensor, records[name], algorithm)

    workers = max(1, min(8, os.cpu_count() or 1))
    checked = [name for name in records if name in tensors]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, reason in zip(checked, pool.map(check, checked), strict=True):
            reasons[name] = reason
    mismatches = [Mismatch(name, reasons[name]) for name in records if reasons[name] is not None]
    if mismatches:
        raise mismatch_error(mismatches, len(records), fingerprint, subject, where)


class FingerprintError(ValueError):
    """A ``base_fingerprint`` record is malformed (a hand-edited, truncated or foreign ``adapter_config.json``)."""


_HEX = re.compile(r"^[0-9a-f]+$")
_FIX = "Fix: re-save the adapter with peft-hft, or remove the base_fingerprint entry to load it unverified."


def validate_fingerprint(fingerprint: Any) -> None:
    """Reject a malformed ``base_fingerprint`` with a :class:`FingerprintError` that names the field.

    A record that cannot prove anything (empty ``tensors``, a record without a digest) is an error, never taken as
    verified; whether it covers every tensor the adapter changes is checked by the reader, which knows the diffs.
    """
    if not isinstance(fingerprint, Mapping):
        raise FingerprintError(
            f"malformed base_fingerprint: expected an object, got {type(fingerprint).__name__}. {_FIX}"
        )
    version = fingerprint.get("format", FINGERPRINT_FORMAT)
    if not isinstance(version, int) or isinstance(version, bool):
        raise FingerprintError(f"malformed base_fingerprint: 'format' must be an integer, got {version!r}. {_FIX}")
    if version > FINGERPRINT_FORMAT:
        raise FingerprintError(
            f"the adapter's base_fingerprint has format {version}, newer than this peft-hft understands "
            f"({FINGERPRINT_FORMAT}). Fix: upgrade peft-hft (pip install -U peft-hft)."
        )
    if version < 1:
        raise FingerprintError(f"malformed base_fingerprint: 'format' must be 1 or more, got {version!r}. {_FIX}")
    algorithm = fingerprint.get("algorithm", _FORMAT_ALGORITHM[version])
    if algorithm not in _ALGORITHMS:
        raise FingerprintError(
            f"unsupported base fingerprint algorithm {algorithm!r}; expected one of {sorted(_ALGORITHMS)}. {_FIX}"
        )
    for key in ("base_model", "revision"):
        if fingerprint.get(key) is not None and not isinstance(fingerprint[key], str):
            raise FingerprintError(f"malformed base_fingerprint: '{key}' must be a string or null. {_FIX}")
    tensors = fingerprint.get("tensors")
    if not isinstance(tensors, Mapping) or not tensors:
        raise FingerprintError(
            "malformed base_fingerprint: 'tensors' must be a non-empty object of per-tensor records (an empty record "
            f"proves nothing about the base). {_FIX}"
        )
    for name, record in tensors.items():
        problem = _record_problem(record, algorithm)
        if problem:
            raise FingerprintError(f"malformed base_fingerprint record of {name!r}: {problem}. {_FIX}")


def _is_digest(value: Any, algorithm: str) -> bool:
    return isinstance(value, str) and len(value) == _ALGORITHMS[algorithm][1] and bool(_HEX.match(value))


def _record_problem(record: Any, algorithm: str) -> Optional[str]:
    if not isinstance(record, Mapping):
        return f"expected an object, got {type(record).__name__}"
    dtype = record.get("dtype")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        return f"'dtype' must name a torch dtype, got {dtype!r}"
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        return f"'shape' must be a list of non-negative integers, got {shape!r}"
    digits = _ALGORITHMS[algorithm][1]
    if not _is_digest(record.get(algorithm), algorithm):
        return f"'{algorithm}' must be a {digits}-digit lower-case hex digest"
    rounded = record.get("rounded", {})
    if not isinstance(rounded, Mapping) or not all(
        isinstance(k, str) and isinstance(getattr(torch, k, None), torch.dtype) and _is_digest(v, algorithm)
        for k, v in rounded.items()
    ):
        return f"'rounded' must map dtype names to {digits}-digit hex digests"
    return None


def make_fingerprint(
    records: dict[str, dict[str, Any]], base_model: Optional[str], revision: Optional[str]
) -> dict[str, Any]:
    return {
        "format": FINGERPRINT_FORMAT,
        "algorithm": ALGORITHM,
        "base_model": base_model or None,
        "revision": revision or None,
        "tensors": records,
    }


def combined_digest(fingerprint: Mapping[str, Any]) -> str:
    """One short id for a whole base fingerprint (SHA-256 over the sorted per-tensor digests), for display."""
    algorithm = record_algorithm(fingerprint)
    h = hashlib.sha256()
    for name in sorted(fingerprint["tensors"]):
        h.update(f"{name}:{fingerprint['tensors'][name][algorithm]}\n".encode())
    return h.hexdigest()
