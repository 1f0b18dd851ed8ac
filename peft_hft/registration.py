"""Registration of HFT as a PEFT method.

PEFT looks methods up by a member of its ``PeftType`` enum, and ``register_peft_method`` refuses names that are not
already members; PEFT offers no public way to add one (huggingface/peft#2273). This module adds the ``HFT`` member to
the enum the way ``enum`` itself builds members, then fills PEFT's lookup tables. Every step is idempotent, so
importing ``peft_hft`` twice, or reloading it, is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "HFT"
PREFIX = "hft_"


def hft_peft_type() -> PeftType:
    """Return ``PeftType.HFT``, adding the member to PEFT's enum on first use."""
    existing = PeftType.__members__.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(type(PeftType), "_add_member_"):  # Python >= 3.13 installs the class-level descriptor itself
        PeftType._add_member_(PEFT_TYPE_NAME, member)
    else:
        PeftType._member_map_[PEFT_TYPE_NAME] = member
        # EnumType.__setattr__ refuses to rebind member names, so go around it.
        type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    if PEFT_TYPE_NAME not in PeftType._member_names_:
        PeftType._member_names_.append(PEFT_TYPE_NAME)
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    return member


def register() -> None:
    """Make ``HFTConfig``/``HFTModel`` known to PEFT (and transformers' adapter integration). Idempotent."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    from .config import HFTConfig
    from .hub import patch_peft
    from .model import HFTModel
    from .transformers_integration import patch_transformers

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
