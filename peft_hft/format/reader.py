"""The one reader of HFT adapter files: everything is validated before any model is touched.

HFT adapters are made to be shared, so a loader reads files that someone else wrote, or that a broken upload
truncated. Every path that reads an adapter (PEFT's ``from_pretrained`` / ``load_adapter``, transformers'
``load_adapter``, ``peft-hft merge`` / ``inspect`` / ``half-reset``, the continual stage history) goes through
:func:`read_adapter`, which checks, before it returns anything:

* ``adapter_config.json``: valid JSON (errors name the file), an object, ``peft_type`` ``"HFT"``, every field of
  :class:`~peft_hft.HFTConfig` well-typed (errors name the file and the field), a non-empty ``selected_parameters``;
* the ``base_fingerprint``: absent (an older adapter: a warning when it is loaded), or complete and well-formed: a
  record for every tensor whose diff the file holds (an empty or partial record is an error, never "verified");
* ``adapter_model.safetensors``: present (a missing file names the directory), a well-formed safetensors header
  whose tensors lie inside the file without overlapping, floating dtypes only (no integer "diffs"), every key the
  diff of a selected tensor, or one of the documented extras where the config allows it (the tuned embeddings in
  full, saved when ``trainable_token_indices`` is set because TRL extended the vocabulary), a diff for every selected
  tensor, shapes equal to those the fingerprint records;
* the values: every tensor finite (the error names the tensor). Opt out with :func:`allow_non_finite` or
  ``PEFT_HFT_ALLOW_NON_FINITE=1`` if you really want NaN/Inf in a model.

Nothing is unpickled: adapters are read as safetensors only (an ``adapter_model.bin`` is refused). Every problem is an
:class:`AdapterFormatError` (a ``ValueError``) whose message names the file, the problem and the fix, or a
``FileNotFoundError`` naming the directory. What is checked against the *model* (the tensors exist there with these
shapes, the base matches the fingerprint) is checked when the adapter is applied, still before anything changes.

Readers take a shared lock on the adapter directory (``flock``, where the platform has it) while they read, and
:mod:`peft_hft.format.writer` publishes saves under the exclusive lock, so a reader never sees the config of one save
with the weights of another.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from ..utils import FLOAT_DTYPES, OptOut, PathLike, dtype_name, listing
from .checkpoint import MappedFile, Source, TensorEntry, is_repo_id, read_header, read_tensor, resolve
from .encoding import Encoding, EncodingError, parse_encoding
from .fingerprint import FingerprintError, validate_fingerprint
from .keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, parameter_name_of, split_part_key
from .writer import directory_lock

PEFT_TYPE = "HFT"
ALLOW_NON_FINITE_ENV = "PEFT_HFT_ALLOW_NON_FINITE"
# dtypes a stored tensor may have: diffs are differences of float weights
TENSOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_allow_non_finite = OptOut("peft_hft_allow_non_finite", ALLOW_NON_FINITE_ENV)
# Tensors whose values this reader has checked (id -> tensor, weakly): a loader handed them trusts them, so every byte
# of an adapter is checked exactly once per load (see is_validated).
_validated: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_validated_config: dict[int, Mapping[str, Any]] = {}  # id -> the adapter_config.json the tensor was read with
_handed_over: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()  # see hand_over


class AdapterFormatError(ValueError):
    """An HFT adapter's files are malformed: the message names the file, the problem and the fix."""


@contextlib.contextmanager
def allow_non_finite() -> Iterator[None]:
    """Read HFT adapters holding NaN or Inf values inside this block (they are refused otherwise).

    Example:
        ```py
        >>> with peft_hft.allow_non_finite():
        ...     model = PeftModel.from_pretrained(base, "adapter-with-infs")
        ```
    """
    with _allow_non_finite.block():
        yield


def non_finite_allowed() -> bool:
    """True inside :func:`allow_non_finite` or when ``PEFT_HFT_ALLOW_NON_FINITE`` is 1/true/yes/on."""
    return _allow_non_finite.active()


# ------------------------------------------------------------------------------------------------------------------
# adapter_config.json
# ------------------------------------------------------------------------------------------------------------------


def load_config_json(path: Path, require_peft_type: bool = True) -> dict[str, Any]:
    """The object in a PEFT ``adapter_config.json``, with errors that name the file (any PEFT method)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{path} is not UTF-8 text ({exc}); the adapter is damaged. Fix: re-save it.") from exc
    try:
        config = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and Python's limit on huge integers
        raise AdapterFormatError(
            f"{path} is not valid JSON ({exc}); the file is damaged or was edited by hand. Fix: re-save the adapter, "
            "or repair the file."
        ) from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, got {type(config).__name__}. Fix: re-save it.")
    peft_type = config.get("peft_type")
    if peft_type is None and not require_peft_type:
        return config
    if peft_type is None:
        raise AdapterFormatError(
            f"{path} has no 'peft_type' field, so PEFT cannot tell which method wrote it. Fix: re-save the adapter; "
            "an HFT adapter has \"peft_type\": \"HFT\"."
        )
    if not isinstance(peft_type, str):
        raise AdapterFormatError(f"{path}: 'peft_type' must be a string such as \"HFT\", got {peft_type!r}.")
    return config


def is_hft_config(config: Mapping[str, Any]) -> bool:
    return str(config.get("peft_type")).split(".")[-1] == PEFT_TYPE


_config_checks: list[Callable[[dict[str, Any]], Any]] = []


def register_config_check(check: Callable[[dict[str, Any]], Any]) -> None:
    """Run ``check(config_dict)`` on every HFT config read (it raises for invalid values). Idempotent."""
    if all(getattr(c, "__qualname__", c) != getattr(check, "__qualname__", check) for c in _config_checks):
        _config_checks.append(check)


def validate_config(config: dict[str, Any], path: Path) -> None:
    """Check an HFT ``adapter_config.json`` object field by field (see the module docstring).

    The fields the files depend on are checked here; the configuration class's own validation (ranges, choices) runs
    through the checks registered with :func:`register_config_check` (the tuner registers ``HFTConfig``'s).
    """
    if not is_hft_config(config):
        raise AdapterFormatError(
            f"{path}: this is a {config.get('peft_type')} adapter, not an HFT adapter. Fix: load or merge it with PEFT "
            "(PeftModel.from_pretrained(...).merge_and_unload()), which handles that method."
        )
    selected = config.get("selected_parameters")
    if (
        not isinstance(selected, list)
        or not selected
        or not all(isinstance(n, str) and n and n.strip() == n for n in selected)
    ):
        raise AdapterFormatError(
            f"{path}: 'selected_parameters' must be a non-empty list of parameter names (save_pretrained writes the "
            f"resolved selection there), got {_short(selected)}. Fix: re-save the adapter."
        )
    if len(set(selected)) != len(selected):
        raise AdapterFormatError(f"{path}: 'selected_parameters' names some tensors twice. Fix: re-save the adapter.")
    kwargs = config  # the fields checked here
    for key in ("base_model_name_or_path", "revision", "layers_pattern"):
        if key in kwargs and kwargs[key] is not None and not isinstance(kwargs[key], (str, list)):
            raise AdapterFormatError(f"{path}: '{key}' must be a string or null, got {_short(kwargs[key])}.")
    for key in ("inference_mode", "init_weights", "train_embeddings"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise AdapterFormatError(f"{path}: '{key}' must be true or false, got {_short(kwargs[key])}.")
    indices = kwargs.get("trainable_token_indices")
    if indices is not None and not _is_index_spec(indices):
        raise AdapterFormatError(
            f"{path}: 'trainable_token_indices' must be a list of token ids or an object of such lists, got "
            f"{_short(indices)}."
        )
    diff_dtype = kwargs.get("diff_dtype")
    if diff_dtype is not None and diff_dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(
            f"{path}: 'diff_dtype' must be null or one of {FLOAT_DTYPES}, got {_short(diff_dtype)}."
        )
    try:
        encoding = parse_encoding(kwargs.get("diff_encoding"))
    except EncodingError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from exc
    if not encoding.lossless and kwargs.get("base_fingerprint") is None and encoding.needs_declared_shape:
        raise AdapterFormatError(
            f"{path}: diff_encoding {encoding.spec!r} stores packed tensors whose shapes only the base_fingerprint "
            "declares, and this adapter has none. Fix: re-encode the adapter with peft-hft compress from an adapter "
            "saved by peft-hft."
        )
    for check in _config_checks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check(config)
        except Exception as exc:  # noqa: BLE001 - any failure of untrusted input is a format error
            raise AdapterFormatError(f"{path} holds an invalid HFT configuration: {exc}") from exc
    fingerprint = config.get("base_fingerprint")
    if fingerprint is not None:
        try:
            validate_fingerprint(fingerprint)
        except FingerprintError as exc:
            raise AdapterFormatError(f"{path}: {exc}") from exc


def _is_index_spec(value: Any) -> bool:
    def ids(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)

    return ids(value) or (isinstance(value, dict) and all(isinstance(k, str) and ids(v) for k, v in value.items()))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class AdapterFile:
    """A validated HFT adapter: its config and its tensors (read into memory, or readable one at a time).

    Use it as a context manager when reading lazily (``load=False``): the weights file stays open, so every tensor
    comes from the very file that was validated even if a new save replaces it meanwhile.

    ``diffs`` maps each trained tensor to the key of its (main) stored tensor; an encoded adapter
    (``diff_encoding``, see :mod:`peft_hft.format.encoding`) also stores parts beside it (``parts``). Decode with
    :meth:`value` (the tuned tensor from a base) or :meth:`diff`.
    """

    source: Source
    directory: Path
    config: dict[str, Any]
    entries: dict[str, TensorEntry]  # checkpoint key -> where the tensor lies
    diffs: dict[str, str]  # parameter name -> checkpoint key of its diff (the main tensor of an encoded diff)
    full: dict[str, str]  # parameter name -> checkpoint key of its tuned value, saved in full (documented extra)
    tensors: Optional[dict[str, torch.Tensor]] = None  # checkpoint key -> tensor, when read with load=True
    parts: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {part ("" = main): key}
    _handle: Optional[BinaryIO] = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.directory / ADAPTER_CONFIG

    @property
    def weights_path(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS

    @property
    def encoding(self) -> Encoding:
        return parse_encoding(self.config.get("diff_encoding"))

    def read(self, key: str) -> torch.Tensor:
        """One tensor by checkpoint key (from memory, or from the file validated by :func:`read_adapter`)."""
        if self.tensors is not None:
            return self.tensors[key]
        return read_tensor(self.entries[key], self._handle)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The declared shape of trained tensor ``name`` (the fingerprint's record, else the stored diff's shape)."""
        return declared_shape(name, self.entries[self.diffs[name]].shape, self.config)

    def read_parts(self, name: str, check: bool = False) -> dict[str, torch.Tensor]:
        """The stored tensors of ``name``'s diff by part (``""`` = main); ``check`` checks their values (for readers
        opened with ``check_values=False``, which check each diff as they use it: still once)."""
        parts = {part: self.read(key) for part, key in self.parts.get(name, {"": self.diffs[name]}).items()}
        if check:
            check_parts(self.encoding, name, parts, self.shape_of(name), self.weights_path, key=self.diffs[name])
        return parts

    def diff(self, name: str, base: Optional[torch.Tensor] = None, check: bool = False) -> torch.Tensor:
        """``tuned - base`` of ``name`` (float32 for encoded diffs; ``"exact"`` needs ``base``)."""
        parts = self.read_parts(name, check)
        if self.encoding.kind == "float":
            return parts[""]
        return self.encoding.diff(parts, self.shape_of(name), base)

    def value(self, name: str, base: torch.Tensor, dtype: torch.dtype, check: bool = False) -> torch.Tensor:
        """The tuned tensor ``name`` in ``dtype``, rebuilt from ``base`` (any dtype)."""
        return self.encoding.value(self.read_parts(name, check), self.shape_of(name), base, dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor by checkpoint key, as PEFT's ``load_peft_weights`` returns them."""
        return {key: self.read(key) for key in self.entries}

    def diff_tensors(self, bases: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """``parameter name -> diff`` (an ``"exact"`` adapter needs ``bases``: parameter name -> base tensor)."""
        if self.encoding.kind == "exact" and bases is None:
            raise AdapterFormatError(
                f"{self.weights_path} stores exact steps from the base (diff_encoding 'exact'); its diffs exist only "
                "against the base tensors. Fix: pass the base model (or load the adapter with PeftModel)."
            )
        return {name: self.diff(name, None if bases is None else bases[name]) for name in self.diffs}

    def stored_bytes(self) -> int:
        """Bytes of tensor data in the weights file."""
        return sum(entry.nbytes for entry in self.entries.values())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> AdapterFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def declared_shape(name: str, stored: tuple[int, ...], config: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape the fingerprint records for ``name``, else the shape of its stored (main) tensor."""
    record = ((config.get("base_fingerprint") or {}).get("tensors") or {}).get(name)
    return tuple(record["shape"]) if record is not None else tuple(stored)


def is_validated(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` was returned by :func:`read_adapter` after its values were checked (the tuner then skips
    its own checks: one validation pass per load)."""
    return _validated.get(id(tensor)) is tensor


def hand_over(tensors: Iterable[torch.Tensor]) -> None:
    """A loader takes the memory of validated tensors for the model's weights (the tuned values are written into
    them): they stop counting as validated, and a second load of them is refused (:func:`handed_over`)."""
    for tensor in tensors:
        key = id(tensor)
        if _validated.pop(key, None) is tensor:
            _handed_over[key] = tensor


def handed_over(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` came from this reader and a load has since written a model's weights into it."""
    return _handed_over.get(id(tensor)) is tensor


def validated_config(tensor: torch.Tensor) -> Optional[Mapping[str, Any]]:
    """The ``adapter_config.json`` object a validated ``tensor`` was read with (its encoding and declared shapes,
    which a loader's in-memory config may not know, e.g. Trainer's resume into a fresh config), else ``None``."""
    return _validated_config.get(id(tensor)) if is_validated(tensor) else None


def _mark_validated(tensor: torch.Tensor, config: Mapping[str, Any]) -> None:
    key = id(tensor)
    _validated[key] = tensor
    _validated_config[key] = config
    weakref.finalize(tensor, _validated_config.pop, key, None)


def check_parts(encoding: Encoding, name: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...],
                where: Any, key: Optional[str] = None) -> None:
    """Check the values of one stored diff (NaN/Inf, and for encoded diffs indices, counts and scales); raise an
    :class:`AdapterFormatError` naming the tensor (``key``: its checkpoint key). The one value check every reading
    path runs, once per tensor."""
    if encoding.kind == "float":
        check_finite(key or name, parts[""], where)
        return
    problem = encoding.check_values(dict(parts), shape)
    if problem:
        raise AdapterFormatError(
            f"{where}: the encoded diff of {name} ({encoding.spec!r}) holds {problem}; decoding it would give wrong "
            "weights. The file is damaged or was written by another tool. Fix: use the adapter as peft-hft wrote it."
        )


def locate(
    name_or_path: PathLike,
    what: str = "ADAPTER",
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    hub_kwargs: Optional[Mapping[str, Any]] = None,
) -> tuple[Source, Path]:
    """The adapter's source and the directory holding its files: a local directory, or the Hub cache.

    From the Hub only the two adapter files are downloaded (with ``hub_kwargs``: token, cache_dir, ...), as PEFT does;
    a missing weights file is reported by :func:`read_adapter`, naming the directory.
    """
    name = str(name_or_path)
    if Path(name).expanduser().exists() or not is_repo_id(name):
        source = resolve(name_or_path, what)
        return source, source.directory / subfolder if subfolder else source.directory
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    kwargs = {k: v for k, v in (hub_kwargs or {}).items() if v is not None}
    try:
        config = Path(hf_hub_download(name, ADAPTER_CONFIG, subfolder=subfolder, revision=revision, **kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"{what} {name!r} is not a local directory, and its {ADAPTER_CONFIG} could not be fetched from the Hugging "
            f"Face Hub ({exc}). Fix: pass a local directory, or download it first (it is then read from the cache, "
            "also offline)."
        ) from exc
    try:
        hf_hub_download(name, ADAPTER_WEIGHTS, subfolder=subfolder, revision=revision, **kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        pass  # reported below, naming the directory
    directory = config.parent
    snapshot = directory.parents[len(Path(subfolder).parts) - 1] if subfolder else directory
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    return Source(snapshot, name, repo_id=name, revision=commit), directory


def read_adapter(
    name_or_path: PathLike,
    *,
    what: str = "ADAPTER",
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    load: bool = True,
    check_values: bool = True,
    hub_kwargs: Optional[Mapping[str, Any]] = None,
) -> AdapterFile:
    """Read and validate an HFT adapter (a directory or a Hub repo id); see the module docstring.

    Args:
        name_or_path: Directory holding ``adapter_config.json`` and ``adapter_model.safetensors``, or a Hub repo id.
        what: How error messages call the adapter (``"ADAPTER"`` on the command line).
        revision / subfolder: For Hub repos and named adapters saved in sub-directories.
        hub_kwargs: Further download arguments for Hub repos (``token``, ``cache_dir``, ``local_files_only``, ...).
        load: Read every tensor into memory (``AdapterFile.tensors``). With ``False`` the tensors are still read once,
            one at a time, to check their values, and the file stays open for :meth:`AdapterFile.read`.
        check_values: Refuse NaN/Inf (unless :func:`allow_non_finite` is in effect).

    Raises:
        AdapterFormatError: anything malformed, named in the message.
        FileNotFoundError: the directory holds no adapter (or not the weights file), named in the message.
    """
    source, directory = locate(name_or_path, what, revision, subfolder, hub_kwargs)
    label = f"{what} {source.name}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    if not directory.is_dir():
        raise FileNotFoundError(f"{label}: {directory} is not a directory.")
    config_path = directory / ADAPTER_CONFIG
    weights_path = directory / ADAPTER_WEIGHTS
    with directory_lock(directory, exclusive=False):
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{label}: {directory} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter directory. Adapters "
                "other than 'default' are saved in sub-directories named after them: pass that sub-directory."
            )
        config = load_config_json(config_path)
        validate_config(config, config_path)
        if not weights_path.is_file():
            legacy = [n for n in ("adapter_model.bin", "adapter_model.pt") if (directory / n).is_file()]
            raise FileNotFoundError(
                f"{label}: {directory} has no {ADAPTER_WEIGHTS}"
                + (
                    f" (only {legacy[0]}, a pickle file, which peft-hft never loads: pickles can run code). Fix: "
                    "re-save the adapter with save_pretrained (safetensors)."
                    if legacy
                    else ". The upload or copy is incomplete. Fix: copy the whole adapter directory again, or re-save "
                    "it."
                )
            )
        try:
            entries, _ = read_header(weights_path)
        except ValueError as exc:
            raise _damaged(exc, label) from exc
        diffs, full, parts = check_tensors({k: (e.dtype, e.shape) for k, e in entries.items()}, config, weights_path)
        handle = open(weights_path, "rb")
        adapter = AdapterFile(source, directory, config, entries, diffs, full, None, parts)
        try:
            adapter.tensors = _read_values(adapter, handle, load, check_values)
        except BaseException:
            handle.close()
            raise
    if load:
        handle.close()
    else:
        adapter._handle = handle
    return adapter


def check_tensors(
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], config: Mapping[str, Any], where: Any
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, str]]]:
    """Check the keys, dtypes and shapes of an adapter's tensors against its config; ``(diffs, full, parts)`` by name.

    ``parts`` maps each trained tensor to its stored tensors by part (``""``: the main tensor; more for the encodings
    of :mod:`peft_hft.format.encoding`, whose dtypes and shapes :meth:`Encoding.check_layout` checks here).

    ``layout`` maps checkpoint keys to ``(dtype, shape)`` (from a safetensors header, or from a state dict handed to
    ``set_peft_model_state_dict``); ``config`` holds at least ``selected_parameters``, ``trainable_token_indices`` and
    ``base_fingerprint``. Every key must be the diff of a selected tensor, or the tuned value in full of a selected
    tensor where ``trainable_token_indices`` is set; every selected tensor needs a diff; floating dtypes only; shapes
    as the fingerprint records them, and a fingerprint (if any) that records exactly the tensors stored as diffs only.
    """
    selected = set(config.get("selected_parameters") or ())
    in_full_allowed = config.get("trainable_token_indices") is not None
    encoding = parse_encoding(config.get("diff_encoding"))
    diffs: dict[str, str] = {}
    full: dict[str, str] = {}
    parts: dict[str, dict[str, str]] = {}
    foreign, unselected, disallowed_full, twice = [], [], [], []
    for key in layout:
        split = split_part_key(key) if encoding.parts else None
        if split is not None and split[0] in selected and split[1] in encoding.parts:
            parts.setdefault(split[0], {})[split[1]] = key
            continue
        name = parameter_name_of(key)
        if name is not None:
            if name in diffs:
                twice.append(name)
            elif name not in selected:
                unselected.append(key)
            else:
                diffs[name] = key
                parts.setdefault(name, {})[""] = key
            continue
        plain = key.removeprefix(PEFT_KEY_PREFIX)
        if key.startswith(PEFT_KEY_PREFIX) and plain in selected:
            if in_full_allowed:
                full[plain] = key
            else:
                disallowed_full.append(key)
        else:
            foreign.append(key)
    problems = []
    if foreign:
        problems.append(
            f"keys that are not HFT diffs ('base_model.model.<module>.hft_diff.<attr>'): {listing(sorted(foreign))}; "
            "a loader must never write such tensors into the model"
        )
    if disallowed_full:
        problems.append(
            f"full tensors {listing(sorted(disallowed_full))}, which an HFT adapter holds only when "
            "'trainable_token_indices' is set (the tuned embeddings of an extended vocabulary)"
        )
    if unselected:
        problems.append(f"diffs of tensors outside 'selected_parameters': {listing(sorted(unselected))}")
    if twice:
        problems.append(f"several diffs of the same tensor: {listing(sorted(twice))}")
    missing = sorted(selected - set(diffs))
    if missing:
        problems.append(f"no diff for the selected tensors {listing(missing)}")
    if problems:
        raise AdapterFormatError(
            f"{where} does not match its {ADAPTER_CONFIG}: " + "; ".join(problems) + ". The file is damaged, was "
            "edited, or belongs to another adapter. Fix: use the adapter as save_pretrained wrote it."
        )
    stray = sorted(key for name, by_part in parts.items() if name not in diffs for key in by_part.values())
    if stray:
        raise AdapterFormatError(
            f"{where}: encoded parts {listing(stray)} belong to no stored diff. The file is damaged. Fix: use the "
            "adapter as peft-hft wrote it."
        )
    plain_keys = set(full.values()) | (set(diffs.values()) if encoding.kind == "float" else set())
    bad_dtype = [
        f"{key} ({dtype_name(dtype)})"
        for key, (dtype, _) in layout.items()
        if key in plain_keys and dtype not in TENSOR_DTYPES
    ]
    if bad_dtype:
        raise AdapterFormatError(
            f"{where} holds tensors that are not float32/bfloat16/float16/float64: {listing(sorted(bad_dtype))}. "
            "Diffs of float weights are floats; the file is damaged or not an HFT adapter."
        )
    if encoding.kind != "float":
        wrong_parts = []
        for name in sorted(diffs):
            shape = declared_shape(name, layout[diffs[name]][1], config) if config.get("base_fingerprint") else None
            problem = encoding.check_layout({p: tuple(layout[k]) for p, k in parts[name].items()}, shape)
            if problem:
                wrong_parts.append(f"{name}: {problem}")
        if wrong_parts:
            raise AdapterFormatError(
                f"{where} does not hold what its diff_encoding {encoding.spec!r} stores: {listing(wrong_parts)}. The "
                "file is damaged or was edited. Fix: use the adapter as peft-hft wrote it."
            )
    fingerprint = config.get("base_fingerprint")
    if fingerprint is not None:
        records = fingerprint["tensors"]
        unrecorded = sorted(set(diffs) - set(full) - set(records))
        if unrecorded:
            raise AdapterFormatError(
                f"{where}: the base_fingerprint in {ADAPTER_CONFIG} records no base tensor for the diffs of "
                f"{listing(unrecorded)}, so the base these diffs belong to cannot be verified. An incomplete "
                "fingerprint is refused, never taken as verified. Fix: re-save the adapter with peft-hft (or remove "
                "base_fingerprint to load it unverified, with a warning)."
            )
        foreign_records = sorted(set(records) - set(diffs))
        if foreign_records:
            raise AdapterFormatError(
                f"{where}: the base_fingerprint in {ADAPTER_CONFIG} records tensors the adapter has no diff of: "
                f"{listing(foreign_records)}. Fix: re-save the adapter with peft-hft."
            )
        wrong = [
            f"{name}: {tuple(layout[key][1])} stored vs {tuple(records[name]['shape'])} recorded"
            for name, key in diffs.items()
            if name in records and tuple(layout[key][1]) != tuple(records[name]["shape"])
            and not encoding.needs_declared_shape
        ]
        if wrong:
            raise AdapterFormatError(
                f"{where}: diff shapes differ from the base tensors recorded in the base_fingerprint: "
                f"{listing(wrong)}. The file is damaged or belongs to another adapter."
            )
    return diffs, full, parts


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN and Inf propagate through min/max, so two reductions decide it without a tensor-sized scratch buffer."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(key: str, tensor: torch.Tensor, where: Any) -> None:
    """Refuse NaN/Inf in ``tensor`` (unless :func:`allow_non_finite` is in effect); the error names the tensor."""
    if non_finite_allowed() or _all_finite(tensor):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise AdapterFormatError(
        f"{where}: tensor {key} holds {bad} NaN/Inf value(s); applying it would give a model that outputs NaN. The "
        "adapter is broken (diverged training or a damaged file). If you really want it, load it inside `with "
        f"peft_hft.allow_non_finite():` or set {ALLOW_NON_FINITE_ENV}=1."
    )


def _damaged(exc: ValueError, label: str = "") -> AdapterFormatError:
    """A malformed or short weights file (``exc`` from :mod:`.checkpoint`, which names the file and the problem)."""
    prefix = f"{label}: " if label else ""
    return AdapterFormatError(f"{prefix}{exc} Fix: copy or download the adapter again.")


def _read_values(
    adapter: AdapterFile, handle: BinaryIO, keep: bool, finite: bool
) -> Optional[dict[str, torch.Tensor]]:
    """Read every tensor once (diff by diff, in file order); keep them if ``keep``; check their values if ``finite``
    (:func:`check_parts`), and mark the kept ones as checked (:func:`is_validated`).

    Kept tensors are copied out of a mapping of the file (:class:`MappedFile`, faster); tensors only checked are read
    one at a time with ``readinto``, so a check of a large adapter holds one tensor in memory."""
    if not keep and not finite:
        return None
    if not keep:
        return _read_groups(adapter, lambda entry: read_tensor(entry, handle), keep, finite)
    try:
        mapped = MappedFile(handle, adapter.entries.values())
    except ValueError as exc:
        raise _damaged(exc) from exc
    with mapped:
        return _read_groups(adapter, mapped.read, keep, finite)


def _read_groups(
    adapter: AdapterFile, read: Callable[[TensorEntry], torch.Tensor], keep: bool, finite: bool
) -> Optional[dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    path = adapter.weights_path
    groups = [(name, by_part) for name, by_part in adapter.parts.items() if name in adapter.diffs]
    groups += [(name, {"": key}) for name, key in adapter.full.items()]
    groups.sort(key=lambda group: adapter.entries[group[1][""]].start)
    encoding = adapter.encoding
    for name, by_part in groups:
        parts = {}
        for part, key in by_part.items():
            try:
                parts[part] = read(adapter.entries[key])
            except ValueError as exc:
                raise _damaged(exc) from exc
        if finite:
            is_full = name in adapter.full and adapter.full[name] == by_part[""]
            check_parts(
                parse_encoding(None) if is_full else encoding, name, parts,
                tuple(parts[""].shape) if is_full else adapter.shape_of(name), path, key=by_part[""],
            )
        if keep:
            for part, key in by_part.items():
                tensors[key] = parts[part]
                if finite:
                    _mark_validated(parts[part], adapter.config)
    return tensors if keep else None


__all__ = [
    "AdapterFile",
    "AdapterFormatError",
    "allow_non_finite",
    "check_finite",
    "check_parts",
    "check_tensors",
    "declared_shape",
    "hand_over",
    "handed_over",
    "is_validated",
    "validated_config",
    "is_hft_config",
    "load_config_json",
    "non_finite_allowed",
    "read_adapter",
    "register_config_check",
    "validate_config",
]

