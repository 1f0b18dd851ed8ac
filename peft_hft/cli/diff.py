"""``peft-hft diff TUNED BASE OUT``: see :func:`peft_hft.ops.extract.extract_adapter`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tuner.config import DIFF_DTYPES, STRATEGIES

    parser.add_argument("tuned", metavar="TUNED", help="fine-tuned checkpoint: directory or Hub repo id")
    parser.add_argument("base", metavar="BASE", help="the checkpoint TUNED was fine-tuned from")
    parser.add_argument("output", metavar="OUT", help="adapter directory to create")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--parameters", nargs="+", metavar="NAME", help="keep only these parameters (full names)")
    select.add_argument(
        "--parameters-file", metavar="FILE",
        help="keep the parameters listed in FILE (one per line) or in an adapter_config.json's selected_parameters",
    )
    select.add_argument(
        "--ratio", type=float, help="keep the tensors an HFTConfig with this ratio selects (e.g. 0.5, as HFT trains)"
    )
    parser.add_argument("--strategy", choices=STRATEGIES, default="category", help="with --ratio (default: category)")
    parser.add_argument("--seed", type=int, default=0, help="with --ratio: seed of the selection (default 0)")
    parser.add_argument("--no-embeddings", action="store_true", help="with --ratio: do not keep embeddings/lm_head")
    parser.add_argument("--diff-dtype", choices=DIFF_DTYPES, help="dtype of the stored diffs (default: the base's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once the new one is done)")
    parser.add_argument("--base-revision", help="revision of BASE when it is a Hub repo id")
    parser.add_argument("--tuned-revision", help="revision of TUNED when it is a Hub repo id")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.extract import CHANGED, extract_adapter, read_selection_file
    from ..tuner.config import HFTConfig
    from ..utils import check_output

    check_output(args.output, args.overwrite, {"TUNED": args.tuned, "BASE": args.base,
                                               "--parameters-file": args.parameters_file})
    if args.parameters:
        selection = list(args.parameters)
    elif args.parameters_file:
        selection = read_selection_file(args.parameters_file)
    elif args.ratio is not None:
        selection = HFTConfig(
            ratio=args.ratio, strategy=args.strategy, seed=args.seed, train_embeddings=not args.no_embeddings
        )
    else:
        selection = CHANGED
    result = extract_adapter(
        args.tuned, args.base, args.output, selection=selection, diff_dtype=args.diff_dtype,
        overwrite=args.overwrite, progress=not args.quiet, base_revision=args.base_revision,
        tuned_revision=args.tuned_revision,
    )
    print(
        f"Wrote {result.output}: {len(result.selected)} diff tensors, {result.adapter_bytes / 1e6:,.1f} MB "
        f"({100 * result.adapter_bytes / max(result.base_bytes, 1):.1f}% of the base checkpoint); "
        f"{len(result.changed)} tensors changed, {len(result.dropped)} of them left out "
        f"({100 * result.kept_change:.1f}% of the squared weight change kept)."
    )
    return 0
