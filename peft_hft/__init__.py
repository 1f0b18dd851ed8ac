"""peft-hft: Half Fine-Tuning (HFT) as a PEFT method.

Importing this package registers the ``"HFT"`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*.from_pretrained`` and transformers' ``model.load_adapter`` handle HFT
adapters::

    import peft_hft
    from peft import get_peft_model

    model = get_peft_model(base_model, peft_hft.HFTConfig(ratio=0.5, seed=0))
"""

from __future__ import annotations

from .format.fingerprint import BaseMismatchError, skip_base_check
from .format.reader import AdapterFormatError, allow_non_finite
from .integrations.low_memory import (
    OptimizerInBackward,
    apply_low_memory_preset,
    low_bit_adamw,
    low_memory_config,
    low_memory_preset,
    optimizer_in_backward,
)
from .integrations.registration import register
from .integrations.retention import RetentionCallback, RetentionProbe
from .ops.estimate_memory import estimate_memory
from .ops.scale import scale_adapter
from .tuner.config import HFTConfig
from .tuner.importance import calibrate, importance_scores
from .tuner.layer import HFTLayer
from .tuner.model import HFTModel
from .tuner.quantize_frozen import quantize_frozen
from .tuner.summary import memory_report, plot_selection, selection_summary

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "BaseMismatchError",
    "HFTConfig",
    "HFTLayer",
    "HFTModel",
    "allow_non_finite",
    "RetentionCallback",
    "RetentionProbe",
    "OptimizerInBackward",
    "apply_low_memory_preset",
    "low_bit_adamw",
    "low_memory_config",
    "low_memory_preset",
    "optimizer_in_backward",
    "calibrate",
    "estimate_memory",
    "importance_scores",
    "memory_report",
    "plot_selection",
    "scale_adapter",
    "quantize_frozen",
    "selection_summary",
    "skip_base_check",
    "__version__",
]

register()
