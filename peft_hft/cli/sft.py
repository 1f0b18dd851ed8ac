"""``peft-hft sft [TRL's sft arguments] [--hft_* ...] [--config run.yaml]``: supervised fine-tuning with HFT.

The arguments are TRL's own (``trl sft --help``: ScriptArguments, SFTConfig, ModelConfig, dataset mixtures, YAML
files through ``--config``) plus HFTConfig's fields as ``--hft_<field>``; TRL parses them and runs its own script with
an HFT adapter (see :mod:`peft_hft.integrations.trl_cli`). Under accelerate: ``accelerate launch -m peft_hft sft ...``.
"""

from __future__ import annotations

import argparse

PASSTHROUGH = True  # TRL's parser reads the arguments (`peft-hft sft --help` shows them)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Nothing: every argument goes to TRL's parser."""


def run(args: argparse.Namespace) -> int:
    """Run TRL's script of the same name as the command (``sft`` here; ``peft-hft dpo`` shares this function)."""
    from ..integrations.trl_cli import run as run_trl_script

    return run_trl_script(args.command, args.passthrough_args)
