"""``peft-hft bench forgetting [--quick] [--model ...] [--task ...] [--output DIR]``: the forgetting benchmark.

The benchmark itself lives in :mod:`peft_hft.bench`; this module is its command line only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ..bench.protocol import Protocol, quick_protocol, sweep_protocol
from ..utils import refuse_output_overlap


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _limits(text: str) -> dict[str, Optional[int]]:
    limits: dict[str, Optional[int]] = {}
    for item in _names(text):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected name=N (e.g. mmlu=500 or mmlu=all), got {item!r}")
        try:
            limits[name] = None if value == "all" else int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or 'all' after {name}=, got {value!r}") from None
    return limits


# CLI flag -> (Protocol field, parser). Flags left out keep the protocol's default (or the quick mode's).
OPTIONS = {
    "--model": ("model", str, "'default' (embedded SmolLM2-135M-Instruct) or a local checkpoint directory"),
    "--task": ("task", str, "'sarcasm' or a JSON-lines file of {\"input\": [messages], \"ideal\": answer}"),
    "--methods": ("methods", _names, "comma-separated method names, e.g. fft,hft,hft_snr,hft_preset,lora (the "
                  "hft_<score> methods: peft_hft.calibrate; an unknown name is refused with the list of all)"),
    "--seeds": ("seeds", _ints, "comma-separated seeds; the first one also runs the learning-rate grid"),
    "--lr-grid": ("full_lr_grid", _floats, "learning-rate grid of full fine-tuning and the HFT variants"),
    "--lora-lr-grid": ("lora_lr_grid", _floats, "learning-rate grid of LoRA"),
    "--prompt": ("prompt", str, "'compact' (last user message + 'Answer:') or 'chat' (the chat template)"),
    "--steps": ("steps", int, "optimiser steps per run"),
    "--batch-size": ("batch_size", int, "sequences per step"),
    "--max-length": ("max_length", int, "longest training sequence in tokens (prompts are cut from the left)"),
    "--loss": ("loss", str, "'full' (every token) or 'completion' (answer tokens only)"),
    "--warmup": ("warmup", float, "share of steps with linear warm-up (then linear decay to 0)"),
    "--precision": ("precision", str, "'auto' (default: bf16 autocast with fp32 weights where the hardware has native "
                    "bf16, else fp32), 'bf16' or 'fp32'; the resolved one is part of the protocol"),
    "--val-size": ("val_size", int, "new-task validation examples (learning-rate choice)"),
    "--test-size": ("test_size", int, "new-task test examples (reported score)"),
    "--retention": ("retention", _names, "comma-separated subset of wikipedia,mmlu,quartz,socialiqa"),
    "--retention-limits": ("retention_limits", _limits, "rows per retention set, e.g. wikipedia=250,mmlu=all"),
    "--eval-batch-size": ("eval_batch_size", int, "scoring batch size"),
    "--scorer": ("scorer", str, "'lm-eval' (lm-eval's requests) or 'packed' (the same metrics, batched: about half "
                 "the time; the default of --sweep)"),
    "--alphas": ("alphas", _floats, "with --sweep: factors of the interpolations base + alpha x diff"),
    "--kl-texts": ("kl_texts", int, "held-out C4 documents the KL to the base is measured on"),
    "--kl-top-k": ("kl_top_k", int, "base log-probabilities kept per token for the KL (0: all, exact)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    forgetting = commands.add_parser(
        "forgetting",
        help="fine-tune with FFT, HFT (several ratios), a model-level random half and LoRA; measure what is forgotten",
        description="Fine-tune a model on a new task with each method and measure, with lm-eval, how much of its "
        "knowledge (Wikipedia perplexity, MMLU, QuaRTz, SocialIQA) each method keeps. Finished runs are saved in "
        "--output and skipped when the command is run again.",
    )
    forgetting.add_argument("--output", type=Path, default=None, help="results directory (default: forgetting-results"
                            " or forgetting-results-quick)")
    forgetting.add_argument("--quick", action="store_true", help="tiny model, a few steps, tiny eval subsets (seconds)")
    forgetting.add_argument("--sweep", action="store_true",
                            help="the learn-forget frontier: FFT, HFT, HFT-SNR and LoRA at every rate of 4-point grids "
                            "on 3 seeds, with interpolations base + alpha x diff (frontier.png, sweep.md)")
    forgetting.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    forgetting.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for flag, (_, parse, help_text) in OPTIONS.items():
        forgetting.add_argument(flag, type=parse, default=None, help=help_text)
    combine = commands.add_parser(
        "combine",
        help="one table from several forgetting-benchmark results directories of the same protocol",
        description="Combine the results.json of forgetting-benchmark runs that used the same protocol with different "
        "--methods (e.g. methods added later in a fresh directory) into one results directory: every method's "
        "table row, its grid, and the paired differences against full fine-tuning recomputed over all of them.",
    )
    combine.add_argument("results", nargs="+", type=Path, help="results directories (or their results.json)")
    combine.add_argument("--output", type=Path, required=True, help="directory for the combined results (new files)")


def build_parser(prog: str = "peft-hft bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return parser


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in OPTIONS.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.quick:
        sweep = {k: v for k, v in sweep_protocol().to_dict().items()
                 if k in ("sweep", "methods", "loss", "retention", "scorer")} if args.sweep else {}
        return quick_protocol(**{**sweep, **overrides})
    protocol = sweep_protocol(**overrides) if args.sweep else Protocol(**overrides)
    if "retention_limits" in overrides:  # a partial list keeps the defaults of the other sets
        protocol.retention_limits = {**Protocol().retention_limits, **overrides["retention_limits"]}
    return protocol


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (the words after ``peft-hft bench``) and run; errors propagate (the library-level entry)."""
    return run(build_parser().parse_args(argv))


def _combine(args: argparse.Namespace) -> int:
    import json

    from ..bench.report import combine_summaries, write_outputs

    summaries = []
    for path in args.results:
        file = path / "results.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; pass a forgetting-benchmark results directory.")
        summaries.append(json.loads(file.read_text()))
    # a results directory given as input is never written into (its results.json would be replaced)
    refuse_output_overlap(args.output, {f"results directory {path}": path for path in args.results})
    combined = combine_summaries(summaries)  # checks everything before a file is written
    args.output.mkdir(parents=True, exist_ok=True)
    paths = write_outputs(combined, args.output)
    print(f"Combined {len(summaries)} results ({', '.join(combined['methods'])}): {paths['markdown']}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "combine":
        return _combine(args)
    protocol = protocol_from_args(args)
    output = args.output or Path("forgetting-results-quick" if args.quick else "forgetting-results")
    # the results directory is resumed (finished runs are kept), but never laid over or around the model or task
    refuse_output_overlap(output, {"--model": None if protocol.model == "default" else protocol.model,
                                   "--task": protocol.task})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:  # the quick mode's tiny model runs fastest on one thread
        torch.set_num_threads(threads)
    from ..bench.forgetting import run

    start = time.perf_counter()
    paths = run(protocol, output, device=args.device)
    print(f"Finished in {time.perf_counter() - start:.0f} s. Results: {paths['markdown']}")
    for key in ("json", "forgetting_plot", "ratio_plot", "paired_plot", "frontier_plot", "kl_plot"):
        if key in paths:
            print(f"  {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
