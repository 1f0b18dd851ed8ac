"""``peft-hft inspect ADAPTER``: see :func:`peft_hft.ops.inspect.inspect_adapter`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", help="HFT adapter: directory or Hub repo id")
    parser.add_argument("--base", help="base checkpoint (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--verify", action="store_true", help="check the base checkpoint against the fingerprint")
    parser.add_argument("--tensors", action="store_true", help="list every diff tensor")
    parser.add_argument("--plot", metavar="PNG", help="write the selection map (blocks x tensors) to this PNG")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--revision", help="revision of ADAPTER when it is a Hub repo id")
    parser.add_argument("--base-revision", help="revision of the base when it is a Hub repo id")


def run(args: argparse.Namespace) -> int:
    from ..ops.inspect import format_info, format_json, inspect_adapter

    info = inspect_adapter(
        args.adapter, base=args.base, verify=args.verify, revision=args.revision, base_revision=args.base_revision,
        plot=args.plot,
    )
    print(format_json(info) if args.json else format_info(info, list_tensors=args.tensors))
    if args.plot and info.summary is None:
        print("(no selection map: the base model's structure is not available; pass --base DIR)")
    return 1 if info.base_check and info.base_check.startswith("MISMATCH") else 0
