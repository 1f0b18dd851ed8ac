"""``add_weighted_adapter`` for HFT: combine several adapters of one model into a new adapter, as LoRA does.

An HFT adapter is a set of full-rank diffs ``tuned - base``, so PEFT's weighted combination is exact task arithmetic
here: ``combination_type="linear"`` gives the new adapter ``base + sum_i w_i * diff_i`` (LoRA's ``linear`` is only an
approximation, its ``cat`` the exact form; for HFT both are the same). The sparsifying combinations PEFT offers for
LoRA (``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) run through PEFT's own
:mod:`peft.utils.merge_utils` on each tensor's diffs, which is how the TIES and DARE papers define them (on full task
vectors). The ``*svd`` types build a low-rank LoRA factorisation and have no meaning for full diffs.

Adapters may select different tensors: the new adapter trains the union, and a tensor an adapter does not select
counts as a zero diff for it. Arithmetic is float32, cast once to each tensor's dtype (as the ledger does when it
loads diffs), so a bf16 model gets ``(base.float() + combination).to(bfloat16)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Literal, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import merge_utils

from .layer import find_ledger

# combination type -> function of (task tensors, weights, density, majority_sign_method)
_MERGES = {
    "linear": lambda t, w, d, m: merge_utils.task_arithmetic(t, w),
    "cat": lambda t, w, d, m: merge_utils.task_arithmetic(t, w),
    "ties": lambda t, w, d, m: merge_utils.ties(t, w, d, m),
    "dare_linear": lambda t, w, d, m: merge_utils.dare_linear(t, w, d),
    "dare_ties": lambda t, w, d, m: merge_utils.dare_ties(t, w, d, m),
    "magnitude_prune": lambda t, w, d, m: merge_utils.magnitude_prune(t, w, d),
}
COMBINATION_TYPES = tuple(_MERGES)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")

CombinationType = Literal["linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def combined_diffs(
    model: BaseTuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str = "linear",
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> dict[str, torch.Tensor]:
    """The float32 diffs of the combination of ``adapters`` of the HFTModel ``model`` (checked; nothing changes)."""
    adapters, weights = _check(model, adapters, weights, combination_type, density, majority_sign_method)
    if len(adapters) == 1:
        combination_type = "linear"  # LoRA does the same: one adapter can only be scaled
    ledger = find_ledger(model.model)
    union = _union(model, adapters)
    merge = _MERGES[combination_type]
    out = {}
    for name in union:
        base = ledger.original(name).float()
        tasks = [
            ledger.current_value(a, name).detach().to(base.device).float() - base
            if name in ledger.hft_adapters[a].params
            else torch.zeros_like(base)
            for a in adapters
        ]
        out[name] = merge(tasks, torch.tensor(weights, dtype=torch.float32, device=base.device), density,
                          majority_sign_method)
    return out


def add_weighted_adapter(
    model: BaseTuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> None:
    """Add ``adapter_name``, the combination of ``adapters`` weighted by ``weights`` (see the module docstring).

    Like LoRA's, the new adapter is added but not activated (``set_adapter(adapter_name)`` to use it) and does not
    train; a name that already exists is left as it is (LoRA returns silently; HFT also warns).
    """
    if adapter_name in model.peft_config:
        warnings.warn(
            f"An adapter named {adapter_name!r} already exists, so add_weighted_adapter did nothing (as LoRA does). "
            "Fix: choose a new name, or delete_adapter() the old one first.",
            stacklevel=3,
        )
        return
    diffs = combined_diffs(model, adapters, weights, combination_type, density, majority_sign_method)
    # The new adapter's config: the first adapter's settings with the union as its selection. It starts at the base
    # (no perturbation) and gets the combined diffs; its fingerprint is recorded when it is saved.
    model.peft_config[adapter_name] = dataclasses.replace(
        model.peft_config[adapters[0]], selected_parameters=list(diffs), init_weights=True, base_fingerprint=None
    )
    try:
        model.inject_adapter(model.model, adapter_name)
        find_ledger(model.model).set_diffs(adapter_name, diffs)
    except Exception:  # leave the model as it was
        if adapter_name in getattr(find_ledger(model.model), "hft_adapters", {}):
            model.delete_adapter(adapter_name)
        model.peft_config.pop(adapter_name, None)
        raise


def _check(
    model: BaseTuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    density: Optional[float],
    majority_sign_method: str,
) -> tuple[list[str], list[float]]:
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter.")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters lists an adapter twice: {adapters}. Fix: give each adapter once, with its weight.")
    ledger = find_ledger(model.model)
    known = sorted(ledger.hft_adapters) if ledger is not None else []
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist; available: {known}.")
        if adapter not in known:
            raise ValueError(f"Adapter {adapter!r} is not an HFT adapter of this model; only HFT adapters combine.")
    if combination_type in SVD_TYPES:
        raise ValueError(
            f"combination_type={combination_type!r} builds a low-rank (SVD) LoRA factorisation, which HFT's full "
            "diffs do not need. Fix: use 'linear' (exact task arithmetic) or one of "
            f"{[t for t in COMBINATION_TYPES if t != 'cat']}; for a low-rank LoRA adapter, convert the result with "
            "peft_hft.ops.to_lora.convert_to_lora."
        )
    if combination_type not in _MERGES:
        raise ValueError(f"Invalid combination_type: {combination_type!r}; HFT supports {list(COMBINATION_TYPES)}.")
    if len(adapters) > 1 and combination_type in NEEDS_DENSITY and (density is None or not 0 <= density <= 1):
        raise ValueError(
            f"combination_type={combination_type!r} needs density in [0, 1] (the share of each diff's entries that "
            f"is kept), got density={density!r}."
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    return adapters, weights


def _union(model: BaseTuner, adapters: Sequence[str]) -> list[str]:
    """The tensors any of ``adapters`` selects, in the model's parameter order."""
    ledger = find_ledger(model.model)
    selected = set().union(*(ledger.hft_adapters[a].params for a in adapters))
    return [name for name, _ in ledger.root.named_parameters() if name in selected]
