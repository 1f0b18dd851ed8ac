"""The ``peft-hft`` command line: ``peft-hft <subcommand> [options]``.

Each subcommand lives in its own module that exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status); its one-line help text is in :data:`SUBCOMMANDS`. Adding a subcommand is one line there; its logic stays in
its module, and its module is imported only when that command runs (``peft-hft --help`` lists every command from
:data:`SUBCOMMANDS` alone, so it imports none of them, nor what they import: TRL, lm-eval, the benchmark).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import NamedTuple, Optional


class Subcommand(NamedTuple):
    module: str  # provides add_arguments(parser) and run(args); PASSTHROUGH = True when it parses its own arguments
    help: str  # the one-line description `peft-hft --help` lists


SUBCOMMANDS: dict[str, Subcommand] = {
    "merge": Subcommand(
        "peft_hft.cli.merge",
        "apply an HFT diff adapter to a base checkpoint on disk, shard by shard (atomic, bounded memory)",
    ),
    "inspect": Subcommand(
        "peft_hft.cli.inspect",
        "describe an HFT adapter: selection, sizes and share of the full model, base model and fingerprint",
    ),
    "diff": Subcommand(
        "peft_hft.cli.diff",
        "turn a fully fine-tuned checkpoint into an HFT diff adapter (all changed tensors, or a selection)",
    ),
    "half-reset": Subcommand(
        "peft_hft.cli.half_reset",
        "reset half of a fully fine-tuned model's tensors to the base (the HFT paper's pilot), as an HFT adapter",
    ),
    "bench": Subcommand(
        "peft_hft.cli.bench",
        "benchmarks to run on your own model: forgetting (FFT vs HFT vs LoRA, what each keeps)",
    ),
    "to-lora": Subcommand(
        "peft_hft.cli.to_lora",
        "convert an HFT adapter to a standard LoRA adapter (truncated SVD of each diff) for LoRA-only serving stacks",
    ),
    "scale": Subcommand(
        "peft_hft.cli.scale",
        "the alpha dial: an HFT adapter whose diffs are alpha times IN's (base + alpha x diff, exact task arithmetic)",
    ),
    "compress": Subcommand(
        "peft_hft.cli.compress",
        "re-encode an HFT adapter: lossless 'exact' steps, or lossy int8/int4/dare/sign (atomic)",
    ),
    "estimate-memory": Subcommand(
        "peft_hft.cli.estimate_memory",
        "estimate the peak training memory of one step (weights, masters, gradients, optimizer state, activations) "
        "for FFT, LoRA, plain freezing and HFT in each memory option, without loading weights",
    ),
    "sft": Subcommand(
        "peft_hft.cli.sft",
        "supervised fine-tuning with HFT through TRL's sft script (TRL's arguments, YAML --config, --hft_*)",
    ),
    "dpo": Subcommand(
        "peft_hft.cli.dpo",
        "preference optimisation (DPO) with HFT through TRL's dpo script (TRL's arguments, YAML --config, --hft_*)",
    ),
}

# Errors that are the user's input, not a bug: printed as one message, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (and its arguments added), the others are listed by name."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="peft-hft",
        description="Tools for Half Fine-Tuning (HFT) adapters: merge, inspect and extract diff adapters, and run the "
        "forgetting benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"peft-hft {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name != command:
            subparsers.add_parser(name, help=help_text, description=help_text)
            continue
        module = importlib.import_module(module_name)
        passthrough = getattr(module, "PASSTHROUGH", False)  # the command parses its own arguments (TRL's parser)
        sub = subparsers.add_parser(name, help=help_text, description=help_text, add_help=not passthrough)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, passthrough=passthrough)
    return parser


def command_of(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in ``argv``: its first word that is not an option (the global options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(argv))
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
