"""HFT adapters through PEFT's own entry points: read strictly first, change nothing on failure, save atomically.

PEFT reads an adapter in steps that each change the model: ``PeftModel.from_pretrained`` wraps the base model and
injects the adapter, *then* reads the weights file and loads it. A damaged file therefore fails half-way, leaving the
base model with a ledger, a ``peft_config`` and every ``requires_grad`` switched off. :func:`patch_peft_loading` (run
when ``peft_hft`` is imported) changes that for HFT adapters only
(:func:`peft_hft.integrations.patching.is_hft_adapter`); every other method takes PEFT's code unchanged, with its
original arguments:

* ``PeftModel.from_pretrained`` / ``PeftModel.load_adapter`` read the adapter with the strict reader
  (:func:`peft_hft.format.reader.read_adapter`) *before* PEFT touches the model, hand PEFT the tensors already read
  (through ``load_peft_weights``, so the file is read once and is the one that was validated), and undo every change
  if anything fails later (:func:`peft_hft.tuner.model.unchanged_on_failure`): a retry with a good adapter works;
  ``load_adapter`` into an existing HFT adapter (``Trainer(resume_from_checkpoint=...)``) first checks that the
  checkpoint has the adapter's selection, and checks the base against the checkpoint's fingerprint
  (:func:`peft_hft.tuner.model.reloading`);
* ``PeftModel.save_pretrained`` of a model with HFT adapters validates the adapter names, writes safetensors only
  and publishes the files in one step (:func:`peft_hft.format.writer.atomic_save`);
* ``get_base_model_state_dict`` returns the base values of the tensors HFT trains in place (PEFT's version returns
  the model's current weights, which for HFT are the tuned ones).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from ..format.reader import AdapterFile, read_adapter
from ..format.writer import atomic_save
from ..tuner.layer import find_ledger
from ..tuner.model import (
    config_from_dict,
    record_fingerprint,
    reloading,
    unchanged_on_failure,
    validate_adapter_name,
)
from .patching import arguments, hft_configs, hub_kwargs, is_hft_adapter, patch

# The adapter read by a from_pretrained/load_adapter wrapper, for the load_peft_weights call PEFT makes inside it.
_preloaded: contextvars.ContextVar[Optional[tuple[str, AdapterFile]]] = contextvars.ContextVar(
    "peft_hft_preloaded", default=None
)


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


def config_of(adapter: AdapterFile):
    """The ``HFTConfig`` of a validated adapter."""
    return config_from_dict(adapter.config)


def _from_pretrained(original):
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        given = arguments(args, kwargs, ("adapter_name", "is_trainable", "config"))
        adapter_name, config = given.get("adapter_name", "default"), given.get("config")
        if not is_hft_adapter(model_id, config, hub_kwargs(kwargs)):
            return original(cls, model, model_id, *args, **kwargs)
        validate_adapter_name(adapter_name)
        adapter = read_for_peft(model_id, kwargs)
        if config is None:  # PEFT would read the config again: hand it the one just validated
            config = config_of(adapter)
            if len(args) >= 3:
                args = (*args[:2], config, *args[3:])
            else:
                kwargs = {**kwargs, "config": config}
        with preloaded(model_id, adapter), unchanged_on_failure(model, adapter_name):
            return original(cls, model, model_id, *args, **kwargs)

    return from_pretrained


def _load_adapter(original):
    def load_adapter(self, model_id, *args, **kwargs):
        adapter_name = arguments(args, kwargs, ("adapter_name",)).get("adapter_name")
        pending = _preloaded.get()
        if (pending is not None and pending[0] == str(model_id)) or not is_hft_adapter(
            model_id, self.peft_config.get(adapter_name), hub_kwargs(kwargs)
        ):  # inside our from_pretrained (already read), or another method
            return original(self, model_id, *args, **kwargs)
        validate_adapter_name(adapter_name)
        adapter = read_for_peft(model_id, kwargs)
        base = self.get_base_model()
        into_existing = (  # Trainer's resume: the selection and the base are checked against the checkpoint's
            reloading(base, adapter_name, config_of(adapter), model_id) if adapter_name in self.peft_config
            else contextlib.nullcontext()
        )
        with preloaded(model_id, adapter), unchanged_on_failure(base, adapter_name), into_existing:
            return original(self, model_id, *args, **kwargs)

    return load_adapter


def _load_peft_weights(original):
    def load_peft_weights(model_id, *args, **kwargs):
        pending = _preloaded.get()
        if pending is not None and pending[0] == str(model_id) and not kwargs.get("key_mapping"):
            return pending[1].state_dict()  # the HFT adapter the wrapper above read and validated
        return original(model_id, *args, **kwargs)

    return load_peft_weights


def _save_pretrained(original):
    def save_hft(self, save_directory, safe_serialization=True, selected_adapters=None, *args, **kwargs):
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not hft_configs(self) or os.path.isfile(save_directory) or not kwargs.get("is_main_process", True):
            return original(self, save_directory, *args, **kwargs)
        return save_hft(self, save_directory, *args, **kwargs)

    return save_pretrained


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


def _get_base_model_state_dict(original):
    def get_base_model_state_dict(model, *args, **kwargs):
        state_dict = original(model, *args, **kwargs)
        return base_model_state_dict(model, state_dict) if hft_configs(model) else state_dict

    return get_base_model_state_dict


def patch_peft_loading() -> None:
    """Install the wrappers described in the module docstring. Idempotent."""
    import peft
    import peft.peft_model
    import peft.utils
    import peft.utils.save_and_load as save_and_load
    from peft import PeftModel

    patch(peft.peft_model, "load_peft_weights", _load_peft_weights)
    patch(PeftModel, "from_pretrained", _from_pretrained)
    patch(PeftModel, "load_adapter", _load_adapter)
    patch(PeftModel, "save_pretrained", _save_pretrained)
    patch(save_and_load, "get_base_model_state_dict", _get_base_model_state_dict, also=(peft.utils, peft))
