"""The ``PeftType.HFT`` member and HFT's parameter prefix.

PEFT looks methods up by a member of its ``PeftType`` enum, and ``register_peft_method`` refuses names that are not
already members; PEFT offers no public way to add one (huggingface/peft#2273). :func:`hft_peft_type` adds the ``HFT``
member the way ``enum`` itself builds members. It lives apart from the registration (which imports the whole tuner)
so that ``HFTConfig`` can name its type without importing the code that registers it. Idempotent.
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
