"""``HFTModel``: the PEFT tuner for Half Fine-Tuning."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Literal, Optional

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..format.encoding import default_encoding, parse_encoding
from ..format.keys import PEFT_KEY_PREFIX, diff_key, parameter_name_of, part_key
from ..format.reader import (
    check_finite,
    check_parts,
    check_tensors,
    declared_shape,
    hand_over,
    handed_over,
    is_validated,
    register_config_check,
    validated_config,
)
from ..utils import float_dtype, listing
from .base_check import record_base, verify_base
from .combine import CombinationType, add_weighted_adapter
from .config import HFTConfig
from .engines import is_full_value
from .layer import LEDGER_ATTRIBUTE, HFTLayer, find_ledger
from .peft_type import PREFIX
from .precision import warn_if_fp16
from .selection import canonical_parameter_names, embedding_parameter_names, resolve_selection, validate_selection


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
        validate_adapter_name(adapter_name)
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
        source = self._adapter_sharing_config(adapter_name, ledger)
        ledger.add_adapter(
            adapter_name,
            names,
            config.originals_device,
            perturb=not config.init_weights,
            seed=config.seed,
            copy_of=source,
            master_weights=config.master_weights,
            share_originals=config.inference_mode,
        )
        if config.master_weights != "none" and not config.inference_mode:
            warn_if_fp16(model, names, config.master_weights)
        if first:
            model.add_module(LEDGER_ATTRIBUTE, ledger)
            for param in model.parameters():
                param.requires_grad_(False)
        config.selected_parameters = list(names)
        self.targeted_parameter_names = sorted(set(self.targeted_parameter_names) | set(names))
        active = [a for a in self.active_adapters if a in ledger.hft_adapters]
        active_config = self.peft_config[active[0]] if active else config
        ledger.set_adapter(active, inference_mode=active_config.inference_mode)

    def _adapter_sharing_config(self, adapter_name: str, ledger: Optional[HFTLayer]) -> Optional[str]:
        """The existing adapter whose config object ``adapter_name`` shares, if any.

        ``peft_model.add_adapter(name, peft_model.peft_config[other])`` is how TRL (DPO, KTO, GRPO, RLOO) makes a frozen
        reference copy of a wrapped adapter; it then copies every parameter named ``*.default.*`` into ``*.ref.*``.
        HFT adapters own no parameters, so that copy would find nothing and the reference would silently be the base
        model. An HFT adapter added with another adapter's very config object therefore starts as a copy of it.
        """
        if ledger is None:
            return None
        config = self.peft_config[adapter_name]
        for other, other_config in self.peft_config.items():
            if other != adapter_name and other_config is config and other in ledger.hft_adapters:
                warnings.warn(
                    f"HFT adapter {adapter_name!r} was added with the config object of adapter {other!r}, so it "
                    f"starts as a copy of {other!r}'s current values (this is how TRL makes its reference adapter). "
                    "The copy holds the tensors that differ from the base model a second time, next to the "
                    "originals. For a fresh adapter with the same settings, pass copy.deepcopy(config) instead.",
                    stacklevel=4,
                )
                return other
        return None

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError("HFT trains tensors in place and replaces no modules.")

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        ledger = find_ledger(model)
        touched = set(ledger.touched()) if ledger is not None else set()
        for name, param in model.named_parameters():
            if name not in touched:
                param.requires_grad_(False)
        if ledger is not None:
            ledger.refresh()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """HFT trains the model's own tensors in their own dtype (PEFT's fp32 upcast would change the model); bf16/fp16
        tensors get fp32 master values inside the optimizer step instead (see precision.py)."""

    def _check_merge_allowed(self) -> None:
        """Merging is always possible: tied tensors are one tensor, trained and merged once."""

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: CombinationType = "linear",
        density: Optional[float] = None,
        majority_sign_method: Literal["total", "frequency"] = "total",
        **svd_options: Any,
    ) -> None:
        """Add ``adapter_name``, a weighted combination of HFT ``adapters`` (LoRA's method, same arguments).

        ``"linear"`` is exact task arithmetic, ``base + sum_i weights[i] * diff_i``; ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"`` and ``"magnitude_prune"`` run PEFT's ``merge_utils`` on each tensor's diffs (``density``
        required). LoRA's SVD options (``svd_rank``, ...) are accepted and ignored, as LoRA ignores them for these
        types. See :mod:`peft_hft.tuner.combine`.
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, density, majority_sign_method)

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
        # applied yet; unloading restores the originals. Like LoRA, merging exactly `adapter_names` (default: the
        # active adapters) leaves every other adapter out of the returned weights, active or not.
        if merge:
            ledger.merge(safe_merge=safe_merge, adapter_names=adapter_names, progressbar=progressbar)
            ledger.apply_merged_only(progressbar=progressbar)
        elif ledger.merged_adapters:  # as LoRA: unload() keeps what merge_adapter() merged into the base weights
            ledger.apply_merged_only(progressbar=progressbar)
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
        out = encoded_state_dict(ledger, adapter_name, config, live)
        refuse_non_finite({k: v for k, v in out.items() if v.is_floating_point()}, adapter_name)
        for name in saved_in_full(ledger, adapter_name, config):
            # TRL sets trainable_token_indices when it extended the vocabulary (a chat template with new tokens). The
            # base values of the new rows were drawn at random in this process, so diffs alone cannot rebuild them:
            # save the tuned embeddings in full as well, under the keys PEFT's save_embedding_layers=True uses.
            value = ledger.current_value(adapter_name, name, live.get(name))
            out[PEFT_KEY_PREFIX + name] = value.detach().to("cpu", copy=True).contiguous()
        # Whoever writes the config next (PEFT's save_pretrained writes it after the weights; peft-hft's save wrapper
        # records it before saving and checks the pair before publishing it) gets the base these diffs belong to.
        record_fingerprint(ledger, adapter_name, config)
        return out

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
        """Apply the diffs in ``state_dict`` to ``adapter_name``; PEFT is left nothing to load itself.

        A mismatch between the adapter and the model (names, shapes, or a base other than the one recorded in
        ``config.base_fingerprint``) raises ``ValueError`` before any weight is changed. Removing an adapter that the
        failed load itself added is the job of the loading entry points (:func:`unchanged_on_failure`); an adapter
        that existed before (a resume into ``default``) is never removed here.
        """
        ledger = find_ledger(model)
        if ledger is None or adapter_name not in ledger.hft_adapters:
            raise ValueError(f"No HFT adapter named {adapter_name!r} was injected; cannot load its diffs.")
        where = f"The checkpoint of HFT adapter {adapter_name!r}"
        # Tensors from the reader come with the config they were read with: their encoding is the file's, whatever
        # the in-memory config says (Trainer resumes a checkpoint into a fresh config, for instance).
        if any(handed_over(value) for value in state_dict.values()):
            raise ValueError(
                f"{where}: this state dict was already loaded into a model, which now computes with its tensors (a "
                "load writes the tuned weights into the memory the reader filled). Fix: read the adapter again for "
                "every load (PeftModel.from_pretrained / load_adapter do)."
            )
        trusted = bool(state_dict) and all(is_validated(value) for value in state_dict.values())
        file_config = validated_config(next(iter(state_dict.values()))) if trusted else None
        settings = {
            "selected_parameters": list(ledger.hft_adapters[adapter_name].params),
            "trainable_token_indices": config.trainable_token_indices,
            "base_fingerprint": config.base_fingerprint,
            "diff_encoding": (file_config or {}).get("diff_encoding", getattr(config, "diff_encoding", None)),
        }
        if file_config is not None and file_config.get("base_fingerprint") is not None and not config.base_fingerprint:
            settings["base_fingerprint"] = file_config["base_fingerprint"]
        # Nothing below changes the model before every check has passed; a loader's own failure handling
        # (unchanged_on_failure) removes an adapter it added, and an existing adapter keeps its values.
        encoding = parse_encoding(settings["diff_encoding"])
        # Keys, dtypes and shapes (header facts, cheap) are sorted out here for every state dict. The values were
        # checked by the reader when the tensors come from it (PeftModel.from_pretrained, load_adapter,
        # transformers' load_adapter): the tuner trusts them. A state dict handed to set_peft_model_state_dict
        # directly gets the reader's value checks here instead: once either way.
        layout = {key: (value.dtype, tuple(value.shape)) for key, value in state_dict.items()}
        diff_keys, full_keys, part_keys = check_tensors(layout, settings, where)
        shapes = {n: declared_shape(n, layout[k][1], settings) for n, k in diff_keys.items()}
        if not trusted:
            for name, by_part in part_keys.items():
                parts = {part: state_dict[key] for part, key in by_part.items()}
                check_parts(encoding, name, parts, shapes[name], where, key=by_part[""])
            for key in full_keys.values():
                check_parts(parse_encoding(None), key, {"": state_dict[key]}, layout[key][1], where, key=key)
        names = list(diff_keys)
        canonical = canonical_parameter_names(ledger.root, names)
        rename = dict(zip(names, canonical, strict=True)) if len(canonical) == len(names) else {n: n for n in names}
        full = {name: state_dict[key] for name, key in full_keys.items()}
        # names and shapes against the model first (meta tensors: nothing is decoded yet), then the base
        declared = {rename[n]: torch.empty(shapes[n], device="meta") for n in names}
        declared.update({n: torch.empty(v.shape, device="meta") for n, v in full.items()})
        ledger.check_diffs(adapter_name, declared)
        verify_base(ledger, config, adapter_name)
        if encoding.kind == "float":
            diffs = {rename[n]: state_dict[k] for n, k in diff_keys.items()}
            for name, value in full.items():
                base = ledger.original(name)
                diffs[name] = value.to(base.device).float() - base.float()
            if trusted:
                hand_over(state_dict.values())
            ledger.set_diffs(adapter_name, diffs, consume=trusted)  # the reader's tensors become the weights
        else:
            values = {}
            for name, by_part in part_keys.items():
                if rename[name] in full:
                    continue  # the tuned value in full replaces it
                base = ledger.original(rename[name])
                parts = {part: state_dict[key] for part, key in by_part.items()}
                values[rename[name]] = encoding.value(parts, shapes[name], base, base.dtype)
            for name, value in full.items():
                base = ledger.original(name)
                values[name] = value.to(device=base.device, dtype=base.dtype)
            ledger.set_values(adapter_name, values)
        if getattr(config, "diff_encoding", None) is None and encoding.kind != "float":
            config.diff_encoding = encoding.spec  # saved again as it was loaded
        return {}


def encoded_state_dict(
    ledger: HFTLayer, adapter_name: str, config: HFTConfig, live: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``adapter_name``'s diffs in ``config.diff_encoding`` (``None``: ``"exact"`` for
    bf16/fp16 tensors, float diffs otherwise; the resolved encoding is recorded in the config)."""
    params = ledger.hft_adapters[adapter_name].params
    spec = config.diff_encoding
    if spec is None:
        spec = default_encoding({ledger.original(n).dtype for n in params}, config.diff_dtype)
    encoding = parse_encoding(spec)
    config.diff_encoding = encoding.spec
    if encoding.kind == "float":
        dtype = float_dtype(config.diff_dtype, "HFTConfig.diff_dtype")
        return {diff_key(name): diff for name, diff in ledger.diffs(adapter_name, dtype, live).items()}
    # the lossy encodings start from the precise update (the fp32 master's diff); "exact" from the weights themselves
    diffs = ledger.diffs(adapter_name, torch.float32, live) if not encoding.lossless else {}
    out = {}
    for name in params:
        base = ledger.original(name).detach().to("cpu")
        tuned = ledger.current_value(adapter_name, name, live.get(name)).detach().to("cpu", base.dtype)
        diff = diffs.get(name)
        for part, tensor in encoding.encode(name, base, tuned, diff if diff is not None else tuned).items():
            out[part_key(name, part)] = tensor.contiguous()
    return out


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


@contextlib.contextmanager
def reloading(model: nn.Module, adapter_name: str, saved: HFTConfig, source: Any) -> Iterator[None]:
    """Load a checkpoint into the existing HFT adapter ``adapter_name`` of ``model`` (the base model holding the
    ledger), as ``Trainer(resume_from_checkpoint=...)`` does with ``load_adapter(ckpt, "default")``.

    Checked first, so that a refusal changes nothing: the checkpoint's selection (``saved``, its
    ``adapter_config.json``) must be the adapter's own (a model rebuilt with another seed draws another half). While
    the diffs are applied, the base is checked against the checkpoint's fingerprint (the adapter in memory records
    none until it is saved, which gave a false "records no base fingerprint" warning and no check); on success the
    adapter keeps that fingerprint, on failure its own comes back.
    """
    ledger = find_ledger(model)
    configs = getattr(model, "peft_config", {})
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if ledger is None or adapter_name not in ledger.hft_adapters or config is None:
        raise ValueError(f"No HFT adapter named {adapter_name!r} in this model to load {source} into.")
    ours = list(ledger.hft_adapters[adapter_name].params)
    theirs = canonical_parameter_names(ledger.root, list(saved.selected_parameters or []))
    only_theirs = [n for n in theirs if n not in set(ours)]
    only_ours = [n for n in ours if n not in set(theirs)]
    if only_theirs or only_ours:
        def settings(c: Any) -> str:
            return f"ratio={c.ratio}, strategy={c.strategy!r}, seed={c.seed}"

        raise ValueError(
            f"The checkpoint {source} trains another selection than the HFT adapter {adapter_name!r} of this model "
            f"({settings(saved)} in the checkpoint, {settings(config)} here): {len(only_theirs)} tensor(s) only in "
            f"the checkpoint ({listing(only_theirs)}), {len(only_ours)} only in the model ({listing(only_ours)}). "
            "Nothing was changed. Fix: build the model with the checkpoint's HFTConfig before resuming (e.g. "
            f"HFTConfig({settings(saved)}), or PeftModel.from_pretrained(base, {str(source)!r}, is_trainable=True)), "
            "or load it under a new adapter name."
        )
    own = config.base_fingerprint
    config.base_fingerprint = saved.base_fingerprint if saved.base_fingerprint is not None else own
    try:
        yield
    except BaseException:
        config.base_fingerprint = own
        raise


def refuse_non_finite(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Refuse to save NaN/Inf diffs (weights that diverged in training): the adapter's own loader would refuse the
    file, so the save would only look like it worked. ``peft_hft.allow_non_finite()`` saves them anyway."""
    for key, value in tensors.items():
        try:
            check_finite(key, value, f"HFT adapter {adapter_name!r}")
        except ValueError:
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"HFT adapter {adapter_name!r} holds {bad} NaN/Inf value(s) in {parameter_name_of(key) or key} "
                "(training diverged: try a lower learning rate, or go back to an earlier checkpoint), and loading "
                "refuses such an adapter; nothing was saved. To save it anyway (e.g. to debug it), save inside "
                "`with peft_hft.allow_non_finite():` and load it the same way."
            ) from None


def saved_in_full(ledger: HFTLayer, adapter_name: str, config: HFTConfig) -> set[str]:
    """Tensors saved as tuned values in full besides their diffs: the embeddings, when the vocabulary was extended
    (``trainable_token_indices`` set, as TRL does), since their new rows' base values exist in no other process."""
    if config.trainable_token_indices is None:
        return set()
    return embedding_parameter_names(ledger.root) & set(ledger.hft_adapters[adapter_name].params)


def record_fingerprint(ledger: HFTLayer, adapter_name: str, config: HFTConfig) -> dict[str, Any]:
    """Record in ``config.base_fingerprint`` the base the adapter's diffs belong to (see ``format/fingerprint.py``).

    Tensors saved in full do not depend on the base (and their random new rows differ between processes), so they
    are not recorded.
    """
    fingerprint = record_base(ledger, adapter_name, config)
    for name in saved_in_full(ledger, adapter_name, config):
        fingerprint["tensors"].pop(name, None)
    config.base_fingerprint = fingerprint
    return fingerprint


def config_from_dict(config: dict[str, Any]) -> HFTConfig:
    """The ``HFTConfig`` of a saved ``adapter_config.json`` (unknown fields, e.g. of a newer peft-hft, are dropped
    with a warning).

    Registered as a check of the adapter reader, so ``HFTConfig``'s own validation runs on every config read.
    """
    known = HFTConfig.__dataclass_fields__
    unknown = sorted(k for k in config if k not in known)
    if unknown:  # as PEFT warns for LoRA (PeftConfig.from_peft_type), naming the fields
        warnings.warn(
            f"Unexpected fields {unknown} in an HFT adapter_config.json are ignored. The adapter was probably saved by "
            "a newer peft-hft; upgrade it (pip install -U peft-hft) before relying on this adapter.",
            stacklevel=2,
        )
    return HFTConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})


register_config_check(config_from_dict)


def validate_adapter_name(adapter_name: Any) -> None:
    """Refuse adapter names that cannot be a directory name: ``save_pretrained`` saves adapter ``name`` in
    ``<save_directory>/<name>``, so a name must never reach outside that directory or collide with its root.

    PEFT accepts any string (it only warns when the name is part of the method prefix); HFT is stricter where the name
    becomes a path: no empty names, no path separators, no ``.``/``..``, no drive letters or NUL characters.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(f"An adapter name must be a string, got {type(adapter_name).__name__} ({adapter_name!r}).")
    problem = None
    if not adapter_name.strip():
        problem = "it is empty (save_pretrained would write it over the 'default' adapter's files)"
    elif "/" in adapter_name or "\\" in adapter_name or (os.altsep and os.altsep in adapter_name):
        problem = "it contains a path separator (save_pretrained would write outside the save directory)"
    elif adapter_name in (".", ".."):
        problem = "it is a relative path component"
    elif "\0" in adapter_name or PureWindowsPath(adapter_name).drive or PurePosixPath(adapter_name).is_absolute():
        problem = "it is not a valid directory name"
    if problem:
        raise ValueError(
            f"Invalid adapter name {adapter_name!r}: {problem}. save_pretrained saves adapters other than 'default' "
            "in a sub-directory named after the adapter. Fix: use a plain name such as 'sft' or 'task_1'."
        )


_MISSING = object()


@contextlib.contextmanager
def unchanged_on_failure(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Undo everything a failed load of ``adapter_name`` into ``model`` did, then re-raise.

    ``model`` is the module the ledger lives in (the base model). Restored: the ledger (removed if the load created
    it, else the new adapter deleted from it), ``peft_config`` (attribute and entry), transformers'
    ``_hf_peft_config_loaded`` flag, and every parameter's ``requires_grad``. A retry then starts from the same model.
    """
    ledger = find_ledger(model)
    adapters_before = set(ledger.hft_adapters) if ledger is not None else set()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    attributes = {name: model.__dict__.get(name, _MISSING) for name in ("peft_config", "_hf_peft_config_loaded")}
    configs = attributes["peft_config"]
    config_names = set(configs) if isinstance(configs, dict) else None
    try:
        yield
    except BaseException:
        ledger = find_ledger(model)
        if ledger is not None and adapter_name in ledger.hft_adapters and adapter_name not in adapters_before:
            rollback_adapter(model, adapter_name)
        for name, value in attributes.items():
            if value is _MISSING:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = value
        if config_names is not None:
            for name in set(configs) - config_names:
                del configs[name]
        for name, param in model.named_parameters():
            if name in requires_grad:
                param.requires_grad_(requires_grad[name])
        raise
