"""The fine-tuning methods compared by the forgetting benchmark, and how each one wraps a fresh base model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..integrations.low_memory import FP32_MOMENT_BITS, PRESET_CLIP_PER_TENSOR, low_memory_config
from ..tuner.config import HFTConfig


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: a label for tables and how to wrap the model."""

    name: str
    label: str
    make_config: Callable[[int], Optional[Any]]  # seed -> PEFT config (None: full fine-tuning)
    ratio: Optional[float] = None  # share of the base tensors trained (None for LoRA)
    adapter_grid: bool = False  # True: uses the adapter learning-rate grid (Protocol.lora_lr_grid)
    # importance strategy of peft_hft.calibrate that picks the tensors within the config's structure (None: its draw)
    calibration: Optional[str] = None
    # the low-memory preset at these bits (peft_hft.low_memory_preset(preset_bits); None: not the preset): the model
    # in bf16 with gradient checkpointing, the preset's HFTConfig fields, and the preset's optimizer fused into
    # backward (make_optimizer: no global clipping, see clip_per_tensor). 32: the preset with torch's AdamW (fp32
    # moments) fused into backward instead of a low-bit one, to measure what the low-bit moments cost
    preset_bits: Optional[int] = None
    # preset methods: each tensor's gradient clipped to this norm in the fused step (the preset's own 1.0; None:
    # unclipped, how the preset ran before it clipped)
    clip_per_tensor: Optional[float] = PRESET_CLIP_PER_TENSOR
    # the frozen half held in NF4 for training (peft_hft.quantize_frozen); the adapter is evaluated on the
    # full-precision base, as a user applies it (for_evaluation)
    frozen_nf4: bool = False
    # the model trained in bf16 (the preset methods always are): bf16 weights, not fp32 weights under autocast
    bf16: bool = False
    # gradient checkpointing (the preset methods always have it): the same values, fewer activations kept
    gradient_checkpointing: bool = False

    @property
    def low_memory(self) -> bool:
        return self.preset_bits is not None

    @property
    def calibration_data(self) -> Optional[str]:
        """What the calibration pass reads: ``"general"`` text, the ``"task"``'s training batches, or nothing."""
        if self.calibration is None or self.calibration == "snr":
            return None
        return "task" if self.calibration == "gradient" else "general"

    def wrap(self, model: nn.Module, seed: int, calibration_batches: Optional[Iterable] = None) -> nn.Module:
        """The model ready to train: the PEFT model for adapters, the model itself (all trainable) for FFT.

        Methods with a ``calibration`` strategy score the base model on ``calibration_batches`` first; the adapter is
        a plain HFT adapter whose config records the strategy.
        """
        config = self.make_config(seed)
        if self.bf16 or self.low_memory:
            model.to(torch.bfloat16)
        if self.low_memory or self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config is None:
            for param in model.parameters():
                param.requires_grad_(True)
            return model
        from peft import get_peft_model

        if self.calibration is not None:
            from ..tuner.importance import calibrate

            if self.calibration_data is not None and calibration_batches is None:
                raise ValueError(f"Method {self.name!r} needs calibration batches ({self.calibration_data} data).")
            config = calibrate(model, calibration_batches, strategy=self.calibration, config=config)
        peft_model = get_peft_model(model, config)
        if self.frozen_nf4:
            from ..tuner.quantize_frozen import quantize_frozen

            quantize_frozen(peft_model)
        return peft_model

    def for_evaluation(self, model: nn.Module, base_model: nn.Module) -> nn.Module:
        """The trained model as it is scored: itself, or for a method that trained against an NF4 frozen half, its
        adapter saved and loaded onto a copy of ``base_model`` in the trained model's dtype (the full-precision
        frozen half, which is what a user applies the adapter to)."""
        if not self.frozen_nf4:
            return model
        import copy
        import tempfile

        from peft import PeftModel

        dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            return PeftModel.from_pretrained(copy.deepcopy(base_model).to(dtype), directory)

    def make_optimizer(self, model: nn.Module, lr: float) -> Optional[torch.optim.Optimizer]:
        """The method's own optimizer over ``model``'s trainable tensors, or None for the loop's AdamW (clipped).
        Without weight decay, as the loop's AdamW."""
        if not self.low_memory:
            return None
        from ..integrations.low_memory import apply_low_memory_preset

        return apply_low_memory_preset(model, self.preset_bits, clip_per_tensor=self.clip_per_tensor, lr=lr,
                                       weight_decay=0.0)


def _hft(ratio: float, strategy: str = "category") -> Callable[[int], HFTConfig]:
    return lambda seed: HFTConfig(ratio=ratio, strategy=strategy, seed=seed)


def _hft_preset(name: str, label: str, bits: int, clip_per_tensor: Optional[float] = PRESET_CLIP_PER_TENSOR,
                frozen_nf4: bool = False, master_weights: Optional[str] = None) -> Method:
    """HFT (ratio 0.5) in the low-memory preset at ``bits`` (``FP32_MOMENT_BITS``: torch's AdamW): its config and its
    optimizer follow the same bits; ``clip_per_tensor`` clips each tensor's gradient in the fused step (the preset's
    own bound unless given); ``frozen_nf4`` holds the frozen half in NF4 while training; ``master_weights`` replaces
    the preset's stochastic rounding (to measure what it costs)."""
    fields = {} if master_weights is None else {"master_weights": master_weights}
    return Method(name, label, lambda seed: low_memory_config(bits, ratio=0.5, seed=seed, **fields),
                  ratio=0.5, preset_bits=bits, clip_per_tensor=clip_per_tensor, frozen_nf4=frozen_nf4)


def _lora(seed: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")


def default_methods() -> list[Method]:
    """Full fine-tuning, HFT (paper default and ratios 0.25 / 0.75), the model-level random half, HFT's structure with
    the tensors picked by an importance score (``peft_hft.calibrate``), HFT in the low-memory preset (4-bit and 8-bit
    AdamW, as defined and unclipped; at 8 bits also against an NF4 frozen half), the preset's parts one at a time
    (a bf16 model alone, Kahan masters instead of stochastic rounding, fp32 moments), and LoRA."""
    return [
        Method("fft", "Full fine-tuning", lambda seed: None, ratio=1.0),
        Method("hft", "HFT (category, 0.5)", _hft(0.5), ratio=0.5),
        Method("hft_r0.25", "HFT (category, 0.25)", _hft(0.25), ratio=0.25),
        Method("hft_r0.75", "HFT (category, 0.75)", _hft(0.75), ratio=0.75),
        Method("hft_model", "Random half (model-level)", _hft(0.5, "model"), ratio=0.5),
        Method("hft_snr", "HFT, highest spectral SNR", _hft(0.5), ratio=0.5, calibration="snr"),
        Method("hft_wanda", "HFT, least Wanda importance on C4", _hft(0.5), ratio=0.5, calibration="wanda"),
        Method("hft_fisher", "HFT, least Fisher on C4", _hft(0.5), ratio=0.5, calibration="fisher"),
        Method("hft_grad", "HFT, largest task gradient", _hft(0.5), ratio=0.5, calibration="gradient"),
        _hft_preset("hft_preset", "HFT, low-memory preset (bf16, SR, AdamW4bit in backward, clip 1.0 per tensor)", 4),
        _hft_preset("hft_preset8", "HFT, low-memory preset at 8 bits (bf16, SR, AdamW8bit in backward, clip 1.0 per "
                    "tensor)", 8),
        _hft_preset("hft_preset8_nf4", "HFT, low-memory preset at 8 bits, trained against an NF4 frozen half", 8,
                    frozen_nf4=True),
        _hft_preset("hft_preset_unclipped", "HFT, low-memory preset, unclipped", 4, None),
        _hft_preset("hft_preset8_unclipped", "HFT, low-memory preset at 8 bits, unclipped", 8, None),
        # what each part of the preset costs: one part at a time replaced by what default HFT does
        Method("hft_bf16", "HFT on a bf16 model (Kahan masters, AdamW, global clip)", _hft(0.5), ratio=0.5, bf16=True),
        _hft_preset("hft_preset8_kahan", "HFT, 8-bit preset with Kahan masters instead of stochastic rounding", 8,
                    master_weights="kahan"),
        _hft_preset("hft_preset_fp32_moments", "HFT, preset with AdamW (fp32 moments) instead of a low-bit one",
                    FP32_MOMENT_BITS),
        # the preset with 1-byte Kahan masters ("kahan8") instead of stochastic rounding, and what fits it in 24 GiB
        # at 8B (the NF4 frozen half)
        _hft_preset("hft_preset_kahan8", "HFT, preset with 1-byte Kahan masters (kahan8) instead of stochastic "
                    "rounding", 4, master_weights="kahan8"),
        _hft_preset("hft_preset_kahan8_nf4", "HFT, preset with kahan8 masters, trained against an NF4 frozen half", 4,
                    master_weights="kahan8", frozen_nf4=True),
        # the offloaded preset (low_memory_preset(offload=True)): default HFT on a bf16 model with its fp32 masters
        # and AdamW in host memory, stepped after backward with the loop's global clipping; and the same masters
        # stepped in backward, clipped per tensor (what the fused step's clipping costs)
        Method("hft_preset_offload", "HFT, offloaded preset (bf16, fp32 masters and AdamW in host memory, global "
               "clip)", lambda seed: low_memory_config(offload=True, ratio=0.5, seed=seed), ratio=0.5, bf16=True,
               gradient_checkpointing=True),
        _hft_preset("hft_offload_in_backward", "HFT, fp32 masters and AdamW in host memory, stepped in backward, "
                    "clip 1.0 per tensor", FP32_MOMENT_BITS, master_weights="fp32_offload"),
        Method("lora", "LoRA (r=16, all linear)", _lora, adapter_grid=True),
    ]


def select_methods(methods: list[Method], names: Optional[list[str]]) -> list[Method]:
    """The methods named in ``names`` (all when None), in the benchmark's order."""
    if names is None:
        return methods
    known = {m.name: m for m in methods}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(known)}.")
    return [m for m in methods if m.name in names]
