"""Half-reset: the paper's pilot experiment as a tool.

Take a fully fine-tuned model and the base it was fine-tuned from, keep the fine-tuned values of a chosen half of the
tensors and reset the other half to the base values. The paper found that this alone recovers much of the base
model's knowledge while keeping most of the new skill, which motivated HFT. The kept half is drawn exactly like an
HFT selection (same strategies and seed as :class:`HFTConfig`), so the result *is* an HFT adapter on the base: its
selection is the kept half, its diffs are ``fine-tuned - base`` there. Save it, load it, merge it like any other.

On the command line, for checkpoints on disk (streamed tensor by tensor): ``peft-hft half-reset TUNED BASE OUT``
(:mod:`peft_hft.cli.half_reset`, built on ``peft-hft diff``'s extraction).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..tuner.config import HFTConfig

logger = logging.getLogger(__name__)


def half_reset(
    finetuned: nn.Module, base: nn.Module, config: Optional[HFTConfig] = None, adapter_name: str = "default"
) -> PeftModel:
    """Keep the fine-tuned values of the tensors ``config`` selects, reset all others to ``base``; as an HFT adapter.

    Args:
        finetuned: The fully fine-tuned model (same architecture and parameter names as ``base``). Not changed.
        base: The model ``finetuned`` was fine-tuned from. It is wrapped in place, as ``get_peft_model`` does.
        config: Which half to keep (default ``HFTConfig()``: the paper's category-level half, seed 0, embeddings,
            ``lm_head`` and the final norm kept). ``ratio`` is the share kept; everything else is reset.
        adapter_name: Name of the adapter.

    Returns:
        A ``PeftModel`` on ``base`` whose adapter holds ``finetuned - base`` on the kept tensors. Its weights are the
        half-reset model; ``merge_and_unload()`` gives it as a plain model, ``save_pretrained`` saves the adapter,
        ``disable_adapter()`` gives the base. The kept tensors are trainable, as after ``get_peft_model``, so HFT
        training can continue from the half-reset model.
    """
    config = HFTConfig() if config is None else config
    if isinstance(finetuned, PeftModel) or isinstance(base, PeftModel):
        raise TypeError(
            "half_reset needs two plain models (the fine-tuned one and its base); merge adapters first "
            "(model = peft_model.merge_and_unload())."
        )
    base_params = dict(base.named_parameters())
    tuned = {name: t for name, t in finetuned.state_dict().items()}
    missing = [n for n in base_params if n not in tuned]
    mismatched = [
        f"{n}: {tuple(tuned[n].shape)} vs {tuple(p.shape)}"
        for n, p in base_params.items()
        if n in tuned and tuple(tuned[n].shape) != tuple(p.shape)
    ]
    if missing or mismatched:
        problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
            [f"shape mismatches {', '.join(mismatched[:5])}"] if mismatched else []
        )
        raise ValueError(
            f"The fine-tuned model does not fit the base ({'; '.join(problems)}). Pass the base model the fine-tuned "
            "one was trained from (same architecture and vocabulary)."
        )
    dtypes = sorted({str(tuned[n].dtype) for n, p in base_params.items() if tuned[n].dtype != p.dtype})
    if dtypes:
        warnings.warn(
            f"The fine-tuned model has tensors in {', '.join(dtypes)}, the base in "
            f"{next(iter(base_params.values())).dtype}: the kept values are cast to the base's dtype. Load both in "
            "the same dtype to keep them exactly.",
            stacklevel=2,
        )
    peft_model = get_peft_model(base, config, adapter_name=adapter_name)
    kept = peft_model.peft_config[adapter_name].selected_parameters
    live = peft_model.get_base_model()
    changed = 0
    with torch.no_grad():
        for name in kept:
            param = live.get_parameter(name)
            value = tuned[name].to(device=param.device, dtype=param.dtype)
            changed += not torch.equal(value, param)
            param.copy_(value)  # the adapter is live: its values are the weights, as after training
    if changed == 0:
        warnings.warn(
            "The fine-tuned model equals the base on every kept tensor, so the half-reset model is the base model. "
            "Check that `finetuned` really is a fine-tuned version of `base`.",
            stacklevel=2,
        )
    kept_set = set(kept)
    reset = [n for n in base_params if n not in kept_set]
    logger.info(
        "half-reset: kept the fine-tuned values of %d tensors (%d changed), reset %d tensors to the base",
        len(kept), changed, len(reset),
    )
    return peft_model
