"""``peft-hft dpo [TRL's dpo arguments] [--hft_* ...] [--config run.yaml]``: preference optimisation (DPO) with HFT.

The arguments are TRL's own (``trl dpo --help``: ScriptArguments, DPOConfig, ModelConfig, dataset mixtures, YAML
files through ``--config``) plus HFTConfig's fields as ``--hft_<field>``; TRL parses them and runs its own script with
an HFT adapter (see :mod:`peft_hft.integrations.trl_cli`). Under accelerate: ``accelerate launch -m peft_hft dpo ...``.
"""

from __future__ import annotations

# Like `peft-hft sft`: every argument goes to TRL's parser, and TRL's script of the command's name runs.
from .sft import PASSTHROUGH, add_arguments, run  # noqa: F401
