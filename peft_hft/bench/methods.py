"""The fine-tuning methods compared by the forgetting benchmark, and how each one wraps a fresh base model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from ..config import HFTConfig


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: a label for tables, how to wrap the model, and its learning-rate grid."""

    name: str
    label: str
    make_config: Callable[[int], Optional[Any]]  # seed -> PEFT config (None: full fine-tuning)
    lr_grid: tuple[float, ...]
    ratio: Optional[float] = None  # share of tensors trained, for HFT variants

    def wrap(self, model: nn.Module, seed: int) -> nn.Module:
        """The model ready to train: the PEFT model for adapters, the model itself (all trainable) for FFT."""
        config = self.make_config(seed)
        if config is None:
            for param in model.parameters():
                param.requires_grad_(True)
            return model
        from peft import get_peft_model

        return get_peft_model(model, config)


# Learning-rate grids (3 points, half a decade apart). Full fine-tuning and HFT update the base weights themselves
# and share a grid; LoRA trains freshly initialised low-rank factors scaled by alpha/r = 0.5 and needs larger steps.
FULL_GRID = (1e-5, 3e-5, 1e-4)
LORA_GRID = (1e-4, 3e-4, 1e-3)


def _hft(ratio: float, strategy: str = "category") -> Callable[[int], HFTConfig]:
    return lambda seed: HFTConfig(ratio=ratio, strategy=strategy, seed=seed)


def _lora(seed: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")


def default_methods(full_grid: tuple[float, ...] = FULL_GRID, lora_grid: tuple[float, ...] = LORA_GRID) -> list[Method]:
    """Full fine-tuning, HFT (paper default and ratios 0.25 / 0.75), the model-level random half, and LoRA."""
    return [
        Method("fft", "Full fine-tuning", lambda seed: None, full_grid, ratio=1.0),
        Method("hft", "HFT (category, 0.5)", _hft(0.5), full_grid, ratio=0.5),
        Method("hft_r0.25", "HFT (category, 0.25)", _hft(0.25), full_grid, ratio=0.25),
        Method("hft_r0.75", "HFT (category, 0.75)", _hft(0.75), full_grid, ratio=0.75),
        Method("hft_model", "Random half (model-level)", _hft(0.5, "model"), full_grid, ratio=0.5),
        Method("lora", "LoRA (r=16, all linear)", _lora, lora_grid),
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
