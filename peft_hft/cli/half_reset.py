"""``peft-hft half-reset TUNED BASE OUT``: the HFT paper's pilot on checkpoints, see :mod:`peft_hft.ops.half_reset`.

Keeps the fine-tuned values of the half of the tensors an ``HFTConfig`` selects and resets the rest to the base, as an
HFT adapter (streamed with :func:`peft_hft.ops.extract.extract_adapter`); ``--merged OUT2`` also writes the half-reset
model as a plain checkpoint (with :func:`peft_hft.ops.merge.merge_checkpoint`).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tuner.config import DIFF_DTYPES, STRATEGIES

    parser.add_argument("tuned", metavar="TUNED", help="the fully fine-tuned checkpoint: directory or Hub repo id")
    parser.add_argument("base", metavar="BASE", help="the checkpoint TUNED was fine-tuned from")
    parser.add_argument("output", metavar="OUT", help="adapter directory to create")
    parser.add_argument("--merged", metavar="OUT2", help="also write the half-reset model as a plain checkpoint here")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of tensors that keep their fine-tuned values")
    parser.add_argument("--strategy", choices=STRATEGIES, default="category", help="selection strategy (HFTConfig)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the selection (HFTConfig.seed)")
    parser.add_argument(
        "--reset-embeddings", action="store_true",
        help="draw embeddings, lm_head and the final norm by the strategy too, instead of always keeping them",
    )
    parser.add_argument("--layers-pattern", help="name of the ModuleList holding the transformer blocks")
    parser.add_argument("--diff-dtype", choices=DIFF_DTYPES, help="dtype of the stored diffs (default: the base's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (and OUT2) if they exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.extract import extract_adapter
    from ..ops.merge import merge_checkpoint
    from ..tuner.config import HFTConfig
    from ..utils import check_output

    # every argument is checked before anything is read or written
    inputs = {"TUNED": args.tuned, "BASE": args.base}
    check_output(args.output, args.overwrite, inputs)
    if args.merged:
        check_output(args.merged, args.overwrite, inputs, outputs={"OUT": args.output})
    config = HFTConfig(
        ratio=args.ratio, strategy=args.strategy, seed=args.seed, train_embeddings=not args.reset_embeddings,
        layers_pattern=args.layers_pattern,
    )
    result = extract_adapter(
        args.tuned, args.base, args.output, selection=config, diff_dtype=args.diff_dtype, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"Wrote the half-reset adapter {result.output}: {len(result.selected)} tensors keep their fine-tuned values, "
        f"{len(result.dropped)} changed tensors are reset to the base "
        f"({100 * result.kept_change:.1f}% of the squared weight change kept)."
    )
    if args.merged:
        merged = merge_checkpoint(args.base, result.output, args.merged, overwrite=args.overwrite,
                                  progress=not args.quiet)
        print(f"Wrote the half-reset model to {merged.output} ({merged.base_check}).")
    return 0
