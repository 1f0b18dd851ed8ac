"""peft-hft: Half Fine-Tuning (HFT) as a PEFT method.

Importing this package registers the ``"HFT"`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*.from_pretrained`` and transformers' ``model.load_adapter`` handle HFT
adapters::

    import peft_hft
    from peft import get_peft_model

    model = get_peft_model(base_model, peft_hft.HFTConfig(ratio=0.5, seed=0))
"""

from __future__ import annotations

from .config import HFTConfig
from .fingerprint import BaseMismatchError, skip_base_check
from .layer import HFTLayer
from .model import HFTModel
from .registration import register
from .summary import plot_selection, selection_summary

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "HFTConfig",
    "HFTLayer",
    "HFTModel",
    "plot_selection",
    "selection_summary",
    "skip_base_check",
    "__version__",
]

register()
