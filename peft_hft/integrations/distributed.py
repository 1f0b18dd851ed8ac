"""HFT on several processes: DDP, FSDP2 and DeepSpeed ZeRO (see docs/distributed.md).

HFT trains the selected tensors of the base model in place, so an engine sees an ordinary, partially frozen model:
gradients and optimizer state exist for the selected half only. Two things need help from this module:

* **Saving.** Under FSDP2 or ZeRO-3 no process holds the trained tensors whole. :func:`save_adapter`, called on every
  process, gathers the trained tensors (and nothing else) one at a time, and the main process writes the diff
  adapter. Trainer's own saving also works when it hands PEFT a gathered state dict (FSDP ``FULL_STATE_DICT``,
  ZeRO-3 ``stage3_gather_16bit_weights_on_model_save: true``).
* **Agreement.** Every process must hold the same selection and the same base values: the selection is drawn from
  ``HFTConfig.seed`` and the model's structure alone, but the base weights are whatever each process loaded.
  :func:`verify_ranks_agree` checks it with one small collective.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from torch import nn

from ..tuner import engines
from ..tuner.layer import find_ledger


def unwrap_peft_model(model: nn.Module) -> PeftModel:
    """The ``PeftModel`` inside a DDP / DeepSpeed / FSDP / ``torch.compile`` wrapper (or ``model`` itself)."""
    inner = model
    while not isinstance(inner, PeftModel):
        # torch.compile keeps the model in _orig_mod; DDP, FSDP1 and DeepSpeed's engine in .module
        wrapped = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if not isinstance(wrapped, nn.Module):
            break
        inner = wrapped
    if not isinstance(inner, PeftModel):
        raise TypeError(
            f"Expected a PeftModel (possibly wrapped by DDP, DeepSpeed or FSDP), got {type(model).__name__}. Fix: "
            "pass the model returned by get_peft_model() or accelerator.prepare()."
        )
    return inner


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def save_adapter(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    *,
    is_main_process: Optional[bool] = None,
    **kwargs: Any,
) -> None:
    """Save the HFT adapter(s) of a model that may be sharded across processes. Call it on **every** process.

    Under FSDP2 and ZeRO-3 each trained tensor is gathered in turn (a collective, hence every process), so the
    memory peak is one tensor, not the model; frozen tensors are never gathered. Under DDP, ZeRO-1/2 or on one
    process it is the same as ``model.save_pretrained(save_directory)`` on the main process. Every process checks
    first that all hold the same selection (:func:`verify_ranks_agree`).

    Args:
        model: The PeftModel, or the engine's wrapper of it (as returned by ``accelerator.prepare``).
        save_directory: Where the adapter goes (``adapter_config.json`` and ``adapter_model.safetensors``).
        is_main_process: Whether this process writes the files; default: global rank 0.
        kwargs: Passed on to ``PeftModel.save_pretrained`` (e.g. ``selected_adapters``, ``state_dict``).
    """
    peft_model = unwrap_peft_model(model)
    rank, world = _rank_and_world()
    if is_main_process is None:
        is_main_process = rank == 0
    verify_ranks_agree(peft_model)
    # No state_dict of the whole model is built: the HFT hook reads (and gathers) only the trained tensors.
    kwargs.setdefault("state_dict", {})
    with engines.collectives_allowed():
        peft_model.save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
    if world > 1:
        torch.distributed.barrier()


def selection_digest(model: nn.Module, check_values: bool = False) -> dict[str, str]:
    """A short digest per HFT adapter of what must be equal on every process (not a base fingerprint).

    It covers the selected tensors' names and full shapes and, with ``check_values``, the bytes of their base values
    (the originals HFT keeps; hashing them reads half the model once).
    """
    ledger = find_ledger(model)
    if ledger is None:
        raise ValueError("This model has no HFT adapter; nothing to digest.")
    out = {}
    for adapter, record in sorted(ledger.hft_adapters.items()):
        digest = hashlib.sha256()
        for name in record.params:
            shape = engines.full_shape(ledger.root.get_parameter(name))
            digest.update(json.dumps([name, list(shape)]).encode())
            if check_values:
                original = ledger.original(name).detach().contiguous().cpu()
                digest.update(original.view(torch.uint8).numpy().tobytes())
        out[adapter] = digest.hexdigest()[:16]
    return out


selection_fingerprint = selection_digest  # the earlier name, kept for existing callers


def verify_ranks_agree(model: nn.Module, check_values: bool = False) -> None:
    """Raise ``RuntimeError`` on every process if the processes hold different HFT selections (or base values).

    A no-op outside ``torch.distributed``. Cheap without ``check_values`` (one small all-gather).
    """
    rank, world = _rank_and_world()
    if world == 1:
        return
    mine = selection_digest(model, check_values)
    everyone: list[Optional[dict[str, str]]] = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    if any(other != everyone[0] for other in everyone):
        lines = "; ".join(f"rank {r}: {fp}" for r, fp in enumerate(everyone))
        what = "selections or base weights" if check_values else "selections"
        raise RuntimeError(
            f"The processes hold different HFT {what} ({lines}). Every process must load the same base model and "
            "create the adapter with the same HFTConfig (the selection depends on HFTConfig.seed and the model's "
            "structure only). Fix: load identical weights on every process and pass the same seed everywhere."
        )
