"""``peft-hft merge BASE ADAPTER OUT``: see :func:`peft_hft.ops.merge.merge_checkpoint`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..ops.merge import OUTPUT_DTYPES

    parser.add_argument("base", metavar="BASE", help="base model: directory with safetensors files, or Hub repo id")
    parser.add_argument("adapter", metavar="ADAPTER", help="HFT adapter: directory or Hub repo id")
    parser.add_argument("output", metavar="OUT", help="directory to create for the merged model")
    parser.add_argument(
        "--dtype", choices=OUTPUT_DTYPES, help="dtype of the merged floating-point tensors (default: as stored)"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="do not check the base against the adapter's base fingerprint"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once the merge is done)")
    parser.add_argument("--base-revision", help="revision of BASE when it is a Hub repo id")
    parser.add_argument("--adapter-revision", help="revision of ADAPTER when it is a Hub repo id")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.merge import merge_checkpoint

    result = merge_checkpoint(
        args.base,
        args.adapter,
        args.output,
        dtype=args.dtype,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        progress=not args.quiet,
        base_revision=args.base_revision,
        adapter_revision=args.adapter_revision,
    )
    print(
        f"Merged {len(result.merged_parameters)} tensors into {result.output} ({result.shards} shard(s), "
        f"{result.bytes_written / 1e6:,.1f} MB; {result.base_check})."
    )
    return 0
