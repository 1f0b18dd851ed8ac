"""The ``peft-hft`` command line.

Every subcommand lives in its own module, which exposes ``add_subcommand(subparsers)``; that function adds an
``argparse`` sub-parser and sets ``func`` (called with the parsed arguments, returning the exit status). Add a
subcommand by listing its module in :data:`SUBCOMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional

# Modules that provide `add_subcommand(subparsers)`, in the order `peft-hft --help` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = ("peft_hft.half_reset",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-hft", description="Half Fine-Tuning (HFT) tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_subcommand(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``peft-hft`` script."""
    import peft_hft  # noqa: F401  (registers HFT with PEFT before any subcommand loads an adapter)

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
