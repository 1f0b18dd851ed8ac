"""``peft-hft estimate-memory MODEL``: see :func:`peft_hft.ops.estimate_memory.estimate_memory`. Writes nothing."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a local model directory or its config.json")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute block activations in backward (the low-memory preset always does)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype the weights are loaded in (default bfloat16)")
    parser.add_argument("--methods", help="comma-separated method names (default: all; see the table)")
    parser.add_argument("--ratio", type=float, default=None, help="HFT's share of trained tensors (default 0.5)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA comparison (default 16)")
    parser.add_argument("--unit", choices=["GiB", "MiB"], default="GiB")
    parser.add_argument("--json", action="store_true", help="machine-readable output: {'methods': {name: {...}}}")


def run(args: argparse.Namespace) -> int:
    from ..ops.estimate_memory import estimate_memory, format_estimate
    from ..tuner.config import HFTConfig

    hft_config = HFTConfig(ratio=args.ratio) if args.ratio is not None else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    estimate = estimate_memory(
        args.model, batch_size=args.batch_size, seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, methods=methods,
        hft_config=hft_config, lora_rank=args.lora_rank,
    )
    print(estimate.to_json() if args.json else format_estimate(estimate, args.unit))
    return 0
