"""HFT adapters through PEFT's own entry points: read strictly first, change nothing on failure, save atomically.

PEFT reads an adapter in steps that each change the model: ``PeftModel.from_pretrained`` wraps the base model and
injects the adapter, *then* reads the weights file and loads it. A damaged file therefore fails half-way, leaving the
base model with a ledger, a ``peft_config`` and every ``requires_grad`` switched off. :func:`patch_peft_loading` (run
when ``peft_hft`` is imported) changes that for HFT adapters only; every other method takes PEFT's code unchanged:

* ``PeftModel.from_pretrained`` / ``PeftModel.load_adapter`` read the adapter with the strict reader
  (:func:`peft_hft.format.reader.read_adapter`) *before* PEFT touches the model, hand PEFT the tensors already read
  (through ``load_peft_weights``, so the file is read once and is the one that was validated), and undo every change
  if anything fails later (:func:`peft_hft.tuner.model.unchanged_on_failure`): a retry with a good adapter works;
* ``PeftConfig`` reading names the file when ``adapter_config.json`` is not valid JSON or lacks ``peft_type`` (PEFT
  raises a bare ``JSONDecodeError`` / ``KeyError``), for every method;
* ``PeftModel.save_pretrained`` of a model with HFT adapters validates the adapter names, writes safetensors only
  and publishes the files in one step (:func:`peft_hft.format.writer.atomic_save`);
* ``get_base_model_state_dict`` returns the base values of the tensors HFT trains in place (PEFT's version returns
  the model's current weights, which for HFT are the tuned ones).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from ..format.keys import ADAPTER_CONFIG
from ..format.reader import AdapterFile, load_config_json, peek_peft_type, read_adapter
from ..format.writer import atomic_save
from ..tuner.layer import find_ledger
from ..tuner.model import config_from_dict, record_fingerprint, unchanged_on_failure, validate_adapter_name

_PATCH_MARKER = "_peft_hft_patched"
_HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download", "proxies")

# The adapter read by a from_pretrained/load_adapter wrapper, for the load_peft_weights call PEFT makes inside it.
_preloaded: contextvars.ContextVar[Optional[tuple[str, AdapterFile]]] = contextvars.ContextVar(
    "peft_hft_preloaded", default=None
)


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The download arguments among ``kwargs`` (what PEFT passes to ``hf_hub_download``)."""
    return {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}


def read_for_peft(model_id: Any, kwargs: dict[str, Any]) -> AdapterFile:
    """Read the HFT adapter PEFT is about to load, with the download arguments PEFT got."""
    hub = hub_kwargs(kwargs)
    revision, subfolder = hub.pop("revision", None), hub.pop("subfolder", None)
    return read_adapter(str(model_id), revision=revision, subfolder=subfolder, hub_kwargs=hub)


@contextlib.contextmanager
def preloaded(model_id: Any, adapter: AdapterFile) -> Iterator[None]:
    token = _preloaded.set((str(model_id), adapter))
    try:
        yield
    finally:
        _preloaded.reset(token)


def _is_hft(model_id: Any, config: Any, kwargs: dict[str, Any]) -> bool:
    from ..tuner.config import HFTConfig

    if config is not None:
        return isinstance(config, HFTConfig)
    hub = hub_kwargs(kwargs)
    subfolder = hub.pop("subfolder", None)
    return peek_peft_type(model_id, subfolder=subfolder, **hub) == "HFT"


def config_of(adapter: AdapterFile):
    """The ``HFTConfig`` of a validated adapter."""
    return config_from_dict(adapter.config)


def _patch_from_pretrained(peft_model_cls: type) -> None:
    original = peft_model_cls.from_pretrained.__func__
    if getattr(original, _PATCH_MARKER, False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, config=None, *args, **kwargs):
        if not _is_hft(model_id, config, kwargs):
            return original(cls, model, model_id, adapter_name, is_trainable, config, *args, **kwargs)
        validate_adapter_name(adapter_name)
        adapter = read_for_peft(model_id, kwargs)
        if config is None:
            config = config_of(adapter)
        with preloaded(model_id, adapter), unchanged_on_failure(model, adapter_name):
            return original(cls, model, model_id, adapter_name, is_trainable, config, *args, **kwargs)

    setattr(from_pretrained, _PATCH_MARKER, True)
    peft_model_cls.from_pretrained = classmethod(from_pretrained)


def _patch_load_adapter(peft_model_cls: type) -> None:
    original = peft_model_cls.load_adapter
    if getattr(original, _PATCH_MARKER, False):
        return

    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        pending = _preloaded.get()
        if (pending is not None and pending[0] == str(model_id)) or not _is_hft(
            model_id, self.peft_config.get(adapter_name), kwargs
        ):  # inside our from_pretrained (already read), or another method
            return original(self, model_id, adapter_name, *args, **kwargs)
        validate_adapter_name(adapter_name)
        adapter = read_for_peft(model_id, kwargs)
        with preloaded(model_id, adapter), unchanged_on_failure(self.get_base_model(), adapter_name):
            return original(self, model_id, adapter_name, *args, **kwargs)

    setattr(load_adapter, _PATCH_MARKER, True)
    peft_model_cls.load_adapter = load_adapter


def _patch_load_peft_weights() -> None:
    import peft.peft_model

    original = peft.peft_model.load_peft_weights
    if getattr(original, _PATCH_MARKER, False):
        return

    @functools.wraps(original)
    def load_peft_weights(model_id, device=None, key_mapping=None, **hf_hub_download_kwargs):
        pending = _preloaded.get()
        if pending is not None and pending[0] == str(model_id) and not key_mapping:
            return pending[1].state_dict()
        return original(model_id, device=device, key_mapping=key_mapping, **hf_hub_download_kwargs)

    setattr(load_peft_weights, _PATCH_MARKER, True)
    peft.peft_model.load_peft_weights = load_peft_weights


def _patch_config_reading() -> None:
    """Name the file when an adapter_config.json is not JSON or has no ``peft_type`` (for every PEFT method)."""
    from peft.config import PeftConfigMixin

    get_type = PeftConfigMixin._get_peft_type.__func__
    if not getattr(get_type, _PATCH_MARKER, False):

        @functools.wraps(get_type)
        def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
            subfolder = hf_hub_download_kwargs.get("subfolder")
            path = Path(str(model_id), subfolder or "", ADAPTER_CONFIG)
            if path.is_file():
                return load_config_json(path)["peft_type"]
            return get_type(cls, model_id, **hf_hub_download_kwargs)

        setattr(_get_peft_type, _PATCH_MARKER, True)
        PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)

    from_json = PeftConfigMixin.from_json_file.__func__
    if not getattr(from_json, _PATCH_MARKER, False):

        @functools.wraps(from_json)
        def from_json_file(cls, path_json_file, **kwargs):
            load_config_json(Path(path_json_file), require_peft_type=False)  # errors that name the file
            return from_json(cls, path_json_file, **kwargs)

        setattr(from_json_file, _PATCH_MARKER, True)
        PeftConfigMixin.from_json_file = classmethod(from_json_file)


def _patch_save_pretrained(peft_model_cls: type) -> None:
    original = peft_model_cls.save_pretrained
    if getattr(original, _PATCH_MARKER, False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, safe_serialization=True, selected_adapters=None, *args, **kwargs):
        from .hub import hft_configs

        if not hft_configs(self) or os.path.isfile(save_directory) or not kwargs.get("is_main_process", True):
            return original(self, save_directory, safe_serialization, selected_adapters, *args, **kwargs)
        encoding = kwargs.pop("diff_encoding", None)  # this save only (HFTConfig.diff_encoding for every save)
        for name in selected_adapters if selected_adapters is not None else list(self.peft_config):
            validate_adapter_name(name)  # a name is a sub-directory: it must stay inside save_directory
        if not safe_serialization:
            warnings.warn(
                "HFT adapters are always saved as safetensors (safe_serialization=False would write a pickle, which "
                "peft-hft never loads: unpickling can run code).",
                stacklevel=2,
            )
        names = selected_adapters if selected_adapters is not None else list(self.peft_config)
        ledger = find_ledger(self)
        for name in names:  # explicitly, before anything is written (the state-dict hook records it again)
            if ledger is not None and name in ledger.hft_adapters:
                record_fingerprint(ledger, name, self.peft_config[name])
        if args:  # save_embedding_layers: HFT saves what it needs itself (diffs, and full embeddings when extended)
            args = (False, *args[1:])
        else:
            kwargs["save_embedding_layers"] = False
        with atomic_save(save_directory) as staging, _encoding_for_save(self, names, encoding):
            _carry_model_cards(Path(save_directory), staging)
            original(self, str(staging), True, selected_adapters, *args, **kwargs)
            for name in names:  # never publish a pair that the reader would refuse
                if ledger is not None and name in ledger.hft_adapters:
                    staged = staging if name == "default" else staging / name
                    read_adapter(staged, load=False, check_values=False).close()

    setattr(save_pretrained, _PATCH_MARKER, True)
    peft_model_cls.save_pretrained = save_pretrained


@contextlib.contextmanager
def _encoding_for_save(peft_model: Any, names: list[str], encoding: Optional[str]) -> Iterator[None]:
    """``save_pretrained(..., diff_encoding=...)``: the HFT adapters ``names`` are saved in ``encoding`` (recorded in
    their saved config); their configs return to their own setting afterwards."""
    if encoding is None:
        yield
        return
    from ..format.encoding import parse_encoding

    parse_encoding(encoding)  # a bad name fails before anything is written
    configs = {n: peft_model.peft_config[n] for n in names if hasattr(peft_model.peft_config[n], "diff_encoding")}
    before = {n: c.diff_encoding for n, c in configs.items()}
    for config in configs.values():
        config.diff_encoding = encoding
    try:
        yield
    finally:
        for n, config in configs.items():
            config.diff_encoding = before[n]


def _carry_model_cards(target: Path, staging: Path) -> None:
    """Start from the cards already in ``target`` so that saving updates them (PEFT keeps hand-written text)."""
    if not target.is_dir():
        return
    for card in [target / "README.md", *target.glob("*/README.md")]:
        if card.is_file() and not card.parent.name.startswith("."):
            destination = staging / card.relative_to(target)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(card, destination)


def base_model_state_dict(peft_model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (original keys) with the base values of the tensors the HFT ledger holds originals of."""
    ledger = find_ledger(peft_model)
    if ledger is None:
        return state_dict
    touched = {name for record in ledger.hft_adapters.values() for name in record.params}
    root = ledger.root
    canonical = {id(p): n for n, p in root.named_parameters()}
    for alias, param in root.named_parameters(remove_duplicate=False):
        name = canonical[id(param)]
        if name in touched and alias in state_dict:
            state_dict[alias] = ledger.original(name).to(param.device)
    return state_dict


def _patch_base_state_dict() -> None:
    import peft
    import peft.utils
    import peft.utils.save_and_load as save_and_load

    original = save_and_load.get_base_model_state_dict
    if getattr(original, _PATCH_MARKER, False):
        return

    @functools.wraps(original)
    def get_base_model_state_dict(model):
        return base_model_state_dict(model, original(model))

    setattr(get_base_model_state_dict, _PATCH_MARKER, True)
    for module in (save_and_load, peft.utils, peft):
        if getattr(module, "get_base_model_state_dict", None) is original:
            module.get_base_model_state_dict = get_base_model_state_dict


def patch_peft_loading() -> None:
    """Install the wrappers described in the module docstring. Idempotent."""
    from peft import PeftModel

    _patch_config_reading()
    _patch_load_peft_weights()
    _patch_from_pretrained(PeftModel)
    _patch_load_adapter(PeftModel)
    _patch_save_pretrained(PeftModel)
    _patch_base_state_dict()
