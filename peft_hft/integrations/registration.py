"""Registration of HFT as a PEFT method: PEFT's lookup tables, plus the PEFT and transformers patches.

The ``HFT`` member of PEFT's ``PeftType`` enum comes from :mod:`peft_hft.tuner.peft_type`. Every step is idempotent,
so importing ``peft_hft`` twice, or reloading it, is harmless.
"""

from __future__ import annotations

from ..tuner.peft_type import PEFT_TYPE_NAME, PREFIX, hft_peft_type


def register() -> None:
    """Make ``HFTConfig``/``HFTModel`` known to PEFT (and transformers' adapter integration). Idempotent."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    from ..tuner.config import HFTConfig
    from ..tuner.model import HFTModel
    from .hub import patch_peft
    from .loading import patch_peft_loading
    from .transformers import patch_transformers

    peft_type = hft_peft_type()
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=HFTConfig, model_cls=HFTModel, prefix=PREFIX)
    else:
        # A reload of peft_hft creates new class objects; point PEFT at the current ones.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = HFTConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = HFTModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
    patch_transformers()
    patch_peft()  # HFT model card in save_pretrained, and a push_to_hub that keeps it
    patch_peft_loading()  # strict reading, nothing half-applied, atomic saves, base state dict
