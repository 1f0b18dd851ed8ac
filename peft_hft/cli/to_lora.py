"""``peft-hft to-lora ADAPTER OUT --rank R``: see :func:`peft_hft.ops.to_lora.adapter_to_lora`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..utils import FLOAT_DTYPES

    parser.add_argument("adapter", metavar="ADAPTER", help="HFT adapter directory")
    parser.add_argument("output", metavar="OUT", help="directory to create for the LoRA adapter")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank (capped at each matrix's full rank)")
    parser.add_argument("--base", help="base model (default: base_model_name_or_path of the adapter)")
    parser.add_argument(
        "--others", choices=("modules_to_save", "drop"), default="modules_to_save",
        help="diffs LoRA cannot express (norms, biases): stored in full as modules_to_save (default), or dropped",
    )
    parser.add_argument(
        "--embeddings", choices=("lora", "drop"), default="lora",
        help="embedding diffs: as LoRA (default), or dropped (LoRA on tied embeddings breaks tie_weights())",
    )
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, help="dtype of the LoRA factors (default: as the tensor)")
    parser.add_argument(
        "--no-verify", action="store_true", help="do not check the base against the adapter's base fingerprint"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.to_lora import REPORT_NAME, adapter_to_lora
    from ..utils import float_dtype

    report = adapter_to_lora(
        args.adapter, args.output, args.rank, base=args.base, others=args.others,
        dtype=float_dtype(args.dtype, "--dtype"), overwrite=args.overwrite, progressbar=not args.quiet,
        embeddings=args.embeddings, verify=not args.no_verify,
    )
    print(f"Wrote LoRA adapter {args.output}: {report.summary()}.")
    if report.dropped:
        print(f"Dropped (not expressible as LoRA): {', '.join(report.dropped)}.")
    print(f"Per-tensor errors: {args.output}/{REPORT_NAME}")
    return 0
