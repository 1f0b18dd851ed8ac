"""The ``peft-hft`` command line: ``peft-hft <subcommand> [options]``.

Each subcommand lives in its own module that exposes ``HELP`` (a one-line description), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Adding a subcommand is one line in :data:`SUBCOMMANDS`; its logic stays in
its module, and its module is imported only when it is listed.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Optional

# name -> module path; the module provides HELP, add_arguments(parser) and run(args).
SUBCOMMANDS: dict[str, str] = {
    "merge": "peft_hft.cli.merge",
    "inspect": "peft_hft.cli.inspect",
    "diff": "peft_hft.cli.diff",
    "half-reset": "peft_hft.cli.half_reset",
    "bench": "peft_hft.cli.bench",
    "to-lora": "peft_hft.cli.to_lora",
    "sft": "peft_hft.cli.sft",
    "dpo": "peft_hft.cli.dpo",
    "estimate-memory": "peft_hft.cli.estimate_memory",
}

# Errors that are the user's input, not a bug: printed as one message, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="peft-hft",
        description="Tools for Half Fine-Tuning (HFT) adapters: merge, inspect and extract diff adapters, and run the "
        "forgetting benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"peft-hft {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        passthrough = getattr(module, "PASSTHROUGH", False)  # the command parses its own arguments (TRL's parser)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP, add_help=not passthrough)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, passthrough=passthrough)
    return parser


def _interrupt_on_termination() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so that commands clean up their temporary output."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``peft-hft`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.passthrough_args = extra
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _interrupt_on_termination()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"peft-hft {args.command}: interrupted; no output was written.", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"peft-hft {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
