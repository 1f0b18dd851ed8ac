"""``HFTModel``: the PEFT tuner for Half Fine-Tuning."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import DIFF_DTYPES, HFTConfig
from .engines import is_full_value
from .fingerprint import record_base, verify_base
from .layer import LEDGER_ATTRIBUTE, HFTLayer, find_ledger
from .registration import PREFIX
from .selection import canonical_parameter_names, resolve_selection, validate_selection

# Saved diffs live under `<module path>.hft_diff.<parameter attribute>`, prefixed like every PEFT checkpoint key.
# The `hft_diff` segment keeps them from ever matching a base-model weight: a generic loader that strips PEFT's prefix
# must not load a diff as if it were a weight.
DIFF_SEGMENT = "hft_diff"
PEFT_KEY_PREFIX = "base_model.model."
_DIFF_KEY_RE = re.compile(rf"^(?:{re.escape(PEFT_KEY_PREFIX)})?(?:(?P<module>.+)\.)?{DIFF_SEGMENT}\.(?P<attr>[^.]+)$")


def diff_key(parameter_name: str) -> str:
    """Checkpoint key of the diff of ``parameter_name`` (e.g. ``...q_proj.weight`` -> ``...q_proj.hft_diff.weight``)."""
    module, _, attr = parameter_name.rpartition(".")
    return f"{PEFT_KEY_PREFIX}{module + '.' if module else ''}{DIFF_SEGMENT}.{attr}"


def parameter_name_of(key: str) -> Optional[str]:
    """Inverse of :func:`diff_key`; ``None`` for keys that are not HFT diffs."""
    match = _DIFF_KEY_RE.match(key)
    if match is None:
        return None
    module = match.group("module")
    return f"{module}.{match.group('attr')}" if module else match.group("attr")


class HFTModel(BaseTuner):
    """Half Fine-Tuning tuner (Hui et al., ACL 2025).

    Trains a selected half of the model's tensors in place and freezes the rest; the architecture is unchanged.
    Create it with ``peft.get_peft_model(model, HFTConfig(...))``.

    Example:
        ```py
        >>> import peft_hft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_hft.HFTConfig(ratio=0.5, seed=0))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = HFTLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ---------------------------------------------------------------------------------------------------------------
    # Injection
    # ---------------------------------------------------------------------------------------------------------------

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Resolve the selection, register the adapter in the model's ledger and set ``requires_grad``.

        Everything that can fail is checked before the model is changed, so a bad config leaves the model as it was.
        """
        config: HFTConfig = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        if config.selected_parameters is None:
            names = resolve_selection(model, config)
        else:
            names = canonical_parameter_names(model, config.selected_parameters)
            validate_selection(model, names)

        ledger = find_ledger(model)
        first = ledger is None
        if first:
            existing = getattr(model, LEDGER_ATTRIBUTE, None)
            if existing is not None:
                raise ValueError(
                    f"{type(model).__name__} already has an attribute {LEDGER_ATTRIBUTE!r} "
                    f"({type(existing).__name__}), which HFT needs for its bookkeeping."
                )
            ledger = HFTLayer(model)
        ledger.add_adapter(
            adapter_name, names, config.originals_device, perturb=not config.init_weights, seed=config.seed
        )
        if first:
            model.add_module(LEDGER_ATTRIBUTE, ledger)
            for param in model.parameters():
                param.requires_grad_(False)
        config.selected_parameters = list(names)
        self.targeted_parameter_names = sorted(set(self.targeted_parameter_names) | set(names))
        active = [a for a in self.active_adapters if a in ledger.hft_adapters]
        active_config = self.peft_config[active[0]] if active else config
        ledger.set_adapter(active, inference_mode=active_config.inference_mode)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError("HFT trains tensors in place and replaces no modules.")

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        ledger = find_ledger(model)
        touched = set(ledger._touched()) if ledger is not None else set()
        for name, param in model.named_parameters():
            if name not in touched:
                param.requires_grad_(False)
        if ledger is not None:
            ledger._refresh()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """HFT trains the model's own tensors in their own dtype; it never creates fp32 copies of them."""

    def _check_merge_allowed(self) -> None:
        """Merging is always possible: tied tensors are one tensor, trained and merged once."""

    @property
    def ledger(self) -> HFTLayer:
        ledger = find_ledger(self.model)
        if ledger is None:
            raise RuntimeError("This model has no HFT adapters (the ledger was removed by unload/merge_and_unload).")
        return ledger

    # ---------------------------------------------------------------------------------------------------------------
    # Unloading
    # ---------------------------------------------------------------------------------------------------------------

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        ledger = self.ledger
        # The weights already hold the trained values, so merging only touches tensors of adapters that are not
        # applied yet; unloading restores the originals.
        if merge:
            ledger.merge(safe_merge=safe_merge, adapter_names=adapter_names, progressbar=progressbar)
        else:
            merged, ledger.merged_adapters = ledger.merged_adapters, []
            try:
                ledger.enable_adapters(False, progressbar=progressbar)
            except Exception:  # refused (a sharded model): leave the model as it was
                ledger.merged_adapters = merged
                raise
        ledger.detach()
        delattr(self.model, LEDGER_ATTRIBUTE)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ---------------------------------------------------------------------------------------------------------------
    # Saving and loading: the checkpoint holds `tuned - base` for each selected tensor, nothing else
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        ledger = find_ledger(model)
        if ledger is None or adapter_name not in ledger.hft_adapters:
            raise ValueError(f"No HFT adapter named {adapter_name!r} in this model; nothing to save.")
        # Prefer the caller's values (e.g. a state dict that Trainer/accelerate gathered under FSDP or ZeRO-3), but
        # only whole tensors: a sharded engine's own state_dict() holds DTensor shards or empty placeholders. The
        # ledger gathers what is missing, or says how to save when it cannot.
        live = {}
        for name in ledger.hft_adapters[adapter_name].params:
            for key in (PEFT_KEY_PREFIX + name, name):
                if key in state_dict:
                    if is_full_value(state_dict[key], ledger.root.get_parameter(name)):
                        live[name] = state_dict[key]
                    break
        dtype = getattr(torch, config.diff_dtype) if config.diff_dtype in DIFF_DTYPES else None
        diffs = {diff_key(name): diff for name, diff in ledger.diffs(adapter_name, dtype, live).items()}
        # The config is saved right after the weights: record the base these diffs belong to (see fingerprint.py).
        config.base_fingerprint = record_base(ledger, adapter_name, config)
        return diffs

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # diff keys never contain the adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Apply the diffs in ``state_dict`` to ``adapter_name``; return what PEFT should load itself (the rest).

        A mismatch between the adapter and the model (names, shapes, or a base other than the one recorded in
        ``config.base_fingerprint``) raises ``ValueError`` after the adapter was removed again, so a failed load leaves
        the model as it was.
        """
        ledger = find_ledger(model)
        diffs, rest = {}, {}
        for key, value in state_dict.items():
            name = parameter_name_of(key)
            if name is None:
                rest[key] = value
            else:
                diffs[name] = value
        if ledger is None or adapter_name not in ledger.hft_adapters:
            raise ValueError(f"No HFT adapter named {adapter_name!r} was injected; cannot load its diffs.")
        if not diffs:
            rollback_adapter(model, adapter_name)
            raise ValueError(
                f"The checkpoint for HFT adapter {adapter_name!r} holds no HFT diffs (keys ending in "
                f"'.{DIFF_SEGMENT}.<name>'); it is not an HFT adapter file. Fix: point to a directory written by "
                "save_pretrained() of an HFT model."
            )
        canonical = canonical_parameter_names(ledger.root, list(diffs))
        if len(canonical) == len(diffs):
            diffs = dict(zip(canonical, diffs.values(), strict=True))
        try:
            ledger.check_diffs(adapter_name, diffs)
            verify_base(ledger, config, adapter_name)
            ledger.set_diffs(adapter_name, diffs)
        except ValueError:
            rollback_adapter(model, adapter_name)
            raise
        return rest


def rollback_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove a just-added adapter after a failed load; remove HFT entirely if it was the only adapter."""
    ledger = find_ledger(model)
    if ledger is None:
        return
    if set(ledger.hft_adapters) == {adapter_name}:
        ledger.enable_adapters(False)
        ledger.detach()
        ledger.restore_requires_grad()
        parent = ledger.root
        if getattr(parent, LEDGER_ATTRIBUTE, None) is ledger:
            delattr(parent, LEDGER_ATTRIBUTE)
        configs = getattr(parent, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
            if not configs:
                del parent.peft_config
    elif adapter_name in ledger.hft_adapters:
        ledger.delete_adapter(adapter_name)
        configs = getattr(ledger.root, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
