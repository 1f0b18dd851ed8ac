"""``peft-hft scale IN OUT --alpha A``: see :func:`peft_hft.ops.scale.scale_adapter`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..utils import FLOAT_DTYPES

    parser.add_argument("adapter", metavar="IN", help="HFT adapter: directory or Hub repo id")
    parser.add_argument("output", metavar="OUT", help="directory to create for the scaled adapter")
    parser.add_argument("--alpha", type=float, required=True,
                        help="factor of the diffs: 0 = the base, 1 = IN, 0.5 = half-way; negative values negate")
    parser.add_argument("--diff-dtype", choices=FLOAT_DTYPES,
                        help="dtype of the scaled diffs (default: IN's; float32 keeps bf16 products unrounded)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once it is complete)")
    parser.add_argument("--revision", help="revision of IN when it is a Hub repo id")
    parser.add_argument("--base", help="base checkpoint; needed when IN stores exact steps (diff_encoding 'exact', "
                        "the default for bf16/fp16 models)")
    parser.add_argument("--base-revision", help="revision of --base when it is a Hub repo id")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.scale import scale_adapter

    result = scale_adapter(args.adapter, args.output, args.alpha, diff_dtype=args.diff_dtype,
                           overwrite=args.overwrite, progress=not args.quiet, revision=args.revision,
                           base=args.base, base_revision=args.base_revision)
    print(f"Scaled {result.tensors} diffs by {result.alpha:g} into {result.output} ({result.bytes_written / 1e6:,.1f} "
          f"MB; base + {result.total_alpha:g} x the original fine-tune's diff).")
    return 0
