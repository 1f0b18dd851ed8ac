"""``peft-hft compress ADAPTER OUT --encoding E``: see :func:`peft_hft.ops.compress.compress_adapter`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", help="HFT adapter: directory or Hub repo id")
    parser.add_argument("output", metavar="OUT", help="directory to create for the re-encoded adapter")
    parser.add_argument(
        "--encoding", required=True,
        help="float | exact | int8[:BLOCK] | int4[:BLOCK] | dare[:DROP[:SEED]] | sign (docs/adapter-format.md)",
    )
    parser.add_argument("--base", help="base checkpoint (needed for 'exact', and to re-encode an 'exact' adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once it is complete)")
    parser.add_argument("--adapter-revision", help="revision of ADAPTER when it is a Hub repo id")
    parser.add_argument("--base-revision", help="revision of BASE when it is a Hub repo id")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.compress import compress_adapter

    result = compress_adapter(
        args.adapter, args.output, args.encoding, base=args.base, overwrite=args.overwrite, progress=not args.quiet,
        adapter_revision=args.adapter_revision, base_revision=args.base_revision,
    )
    print(
        f"Wrote {result.output}: {result.tensors} tensors ({result.parameters:,} parameters) as {result.encoding!r}, "
        f"{result.bytes_after / 1e6:,.1f} MB ({result.ratio:.1%} of the {result.bytes_before / 1e6:,.1f} MB before, "
        f"{result.bytes_after / max(result.parameters, 1):.3f} bytes per trained parameter)."
    )
    return 0
