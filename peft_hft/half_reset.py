"""Half-reset: the paper's pilot experiment as a tool.

Take a fully fine-tuned model and the base it was fine-tuned from, keep the fine-tuned values of a chosen half of the
tensors and reset the other half to the base values. The paper found that this alone recovers much of the base
model's knowledge while keeping most of the new skill, which motivated HFT. The kept half is drawn exactly like an
HFT selection (same strategies and seed as :class:`HFTConfig`), so the result *is* an HFT adapter on the base: its
selection is the kept half, its diffs are ``fine-tuned - base`` there. Save it, load it, merge it like any other.

Also available on the command line: ``peft-hft half-reset --base BASE --finetuned FT --output DIR``.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from .atomic_io import write_directory_atomically
from .config import DIFF_DTYPES, STRATEGIES, HFTConfig

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


# ---------------------------------------------------------------------------------------------------------------
# Command line: `peft-hft half-reset`
# ---------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``half-reset`` with the ``peft-hft`` command line."""
    parser = subparsers.add_parser(
        "half-reset",
        help="keep the fine-tuned values of half of the tensors, reset the rest to the base; save as an HFT adapter",
        description=(
            "Half-reset (the HFT paper's pilot): keep the fine-tuned values of a chosen half of the tensors of a "
            "fully fine-tuned model, reset all other tensors to the base model, and save the result as an HFT "
            "adapter on the base (and optionally as a merged checkpoint)."
        ),
    )
    parser.add_argument("--base", required=True, help="base model: a local checkpoint directory or a Hub id")
    parser.add_argument("--finetuned", required=True, help="the fully fine-tuned model (directory or Hub id)")
    parser.add_argument("--output", required=True, help="directory for the HFT adapter (must be new or empty)")
    parser.add_argument("--merged-output", help="also write the half-reset model as a plain checkpoint here")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of tensors that keep fine-tuned values")
    parser.add_argument("--strategy", choices=STRATEGIES, default="category", help="selection strategy (HFTConfig)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the selection (HFTConfig.seed)")
    parser.add_argument(
        "--reset-embeddings", action="store_true",
        help="also draw embeddings/lm_head/final norm by the strategy instead of always keeping them",
    )
    parser.add_argument("--layers-pattern", help="name of the ModuleList holding the transformer blocks")
    parser.add_argument("--diff-dtype", choices=DIFF_DTYPES, help="dtype of the saved diffs (HFTConfig.diff_dtype)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype to load both models in")
    parser.set_defaults(func=run_cli)


def _check_output(path: Union[str, os.PathLike]) -> Path:
    """Refuse an occupied output directory before any model is loaded."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SystemExit(f"peft-hft half-reset: {path} exists and is not an empty directory; choose a new one.")
    return path


def run_cli(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = _check_output(args.output)
    merged = _check_output(args.merged_output) if args.merged_output else None
    config = HFTConfig(
        ratio=args.ratio,
        strategy=args.strategy,
        seed=args.seed,
        train_embeddings=not args.reset_embeddings,
        layers_pattern=args.layers_pattern,
        diff_dtype=args.diff_dtype,
    )
    dtype = _DTYPES[args.dtype]
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    finetuned = AutoModelForCausalLM.from_pretrained(args.finetuned, dtype=dtype)
    peft_model = half_reset(finetuned, base, config)
    del finetuned
    write_directory_atomically(output, peft_model.save_pretrained)
    kept = len(peft_model.peft_config["default"].selected_parameters)
    total = sum(1 for _ in peft_model.get_base_model().named_parameters())
    print(f"Saved the half-reset HFT adapter ({kept} of {total} tensors keep fine-tuned values) to {output}")
    if merged is not None:
        model = peft_model.merge_and_unload()

        def save_merged(path: Path) -> None:
            model.save_pretrained(path)
            try:
                AutoTokenizer.from_pretrained(args.finetuned).save_pretrained(path)
            except (OSError, ValueError):  # a checkpoint without a tokenizer is still a valid model
                logger.warning("No tokenizer found in %s; the merged checkpoint has none.", args.finetuned)

        write_directory_atomically(merged, save_merged)
        print(f"Saved the half-reset model as a plain checkpoint to {merged}")
    return 0
