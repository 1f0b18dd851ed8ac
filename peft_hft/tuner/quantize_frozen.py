"""The frozen half in 4-bit for training: QLoRA's idea applied to the tensors HFT does not train.

HFT freezes half of the block matrices; during training they are only read (the forward pass, and the input gradient
of backward), so they can be held in 4-bit NormalFloat (NF4, QLoRA's format) through torchao's ``NF4Tensor``, which
computes ``F.linear`` against a dequantized copy and returns the input gradient (torchtune's QLoRA uses the same
tensor). That takes the frozen matrices from 2 bytes (bf16) to about 0.52 bytes per element.

What stays full precision, and why the adapter is unchanged:

* only frozen ``nn.Linear`` weights *inside the transformer blocks* are quantized; trained tensors, biases, norms,
  embeddings and ``lm_head`` are not touched;
* an HFT adapter holds diffs of its *trained* tensors only (trained - original, the originals kept by the ledger at
  full precision), and its base fingerprint covers exactly those tensors, so an adapter trained against a quantized
  frozen half saves, loads, verifies its base and merges (``peft-hft merge``, ``merge_and_unload`` on a
  full-precision base) exactly as one trained against the full-precision model. What changes is what the trained half
  *learned to work with*: apply the adapter to the full-precision base, which is what docs/benchmarks.md measures.

Do not ``merge_and_unload`` the quantized training model itself if a full-precision model is wanted: its frozen half
is NF4. Load the adapter onto the full-precision base instead.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Optional

import torch
from torch import nn

from .layer import find_ledger
from .selection import analyze_model

NF4_BLOCK_SIZE = 64  # elements per absmax block (QLoRA's and torchao's default)
NF4_SCALER_BLOCK_SIZE = 256  # block scales per double-quantization group (torchao's default, reduced to divide)


def quantizable_weights(model: nn.Module, selection: Collection[str], layers_pattern: Optional[str] = None
                        ) -> list[str]:
    """Names of the frozen ``nn.Linear`` weights inside the transformer blocks of ``model``: those not in
    ``selection`` (the trained tensors) that NF4 can hold (element count divisible by the block size)."""
    trained = set(selection)
    modules = dict(model.named_modules())
    names = []
    for unit in analyze_model(model, layers_pattern).block_units():
        name = unit.params[0]
        if name in trained or not name.endswith(".weight"):
            continue
        module = modules.get(name.rsplit(".", 1)[0])
        if isinstance(module, nn.Linear) and module.weight.numel() % NF4_BLOCK_SIZE == 0:
            names.append(name)
    return names


def _scaler_block_size(numel: int) -> int:
    """The largest double-quantization group <= 256 that divides the number of blocks (torchao requires it)."""
    blocks = numel // NF4_BLOCK_SIZE
    return max(d for d in range(1, NF4_SCALER_BLOCK_SIZE + 1) if blocks % d == 0)


def nf4_bytes(numel: int, element_size: int = 2) -> int:
    """Bytes torchao's ``NF4Tensor`` holds for ``numel`` elements: packed 4-bit codes, one int8 scale per block, one
    scale factor (in the weight's dtype) per group of block scales, and a mean and the 16-entry code table."""
    blocks = numel // NF4_BLOCK_SIZE
    groups = blocks // _scaler_block_size(numel)
    return numel // 2 + blocks + groups * element_size + 17 * element_size


def quantize_frozen(model: nn.Module) -> list[str]:
    """Hold the frozen block matrices of an HFT model in NF4 (torchao) for training; returns the names quantized.

    Call it after ``get_peft_model(model, HFTConfig(...))`` and before creating the optimizer. The frozen weights of
    every HFT adapter's selection are left alone if any adapter trains them.

    Raises:
        ValueError: if ``model`` has no HFT adapter (the frozen half is not known), or a weight to quantize requires
            grad (it would be trained).
        ImportError: if torchao is not installed.
    """
    ledger = find_ledger(model)
    if ledger is None:
        raise ValueError(
            f"{type(model).__name__} has no HFT adapter, so its frozen half is not known. Fix: call "
            "quantize_frozen(get_peft_model(model, HFTConfig(...)))."
        )
    try:
        from torchao.dtypes.nf4tensor import to_nf4
    except ImportError:  # torchao >= 0.15 moved it
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            raise ImportError("quantize_frozen needs torchao: pip install torchao") from None
    root = ledger.root
    trained = {name for adapter in ledger.hft_adapters.values() for name in adapter.params}
    configs = getattr(root, "peft_config", {}) or {}
    patterns = {getattr(c, "layers_pattern", None) for c in configs.values()} or {None}
    names = quantizable_weights(root, trained, next(iter(patterns)))
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = root.get_submodule(module_name)
        weight = getattr(module, attr)
        if weight.requires_grad:
            raise ValueError(f"{name} requires grad but is frozen by HFT; freeze it before quantizing.")
        if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            continue
        quantized = to_nf4(weight.detach(), NF4_BLOCK_SIZE, _scaler_block_size(weight.numel()))
        setattr(module, attr, nn.Parameter(quantized, requires_grad=False))
    return names
