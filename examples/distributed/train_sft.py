"""Supervised fine-tuning with HFT (or full fine-tuning) on several processes, under any accelerate engine.

The same script runs under DDP, FSDP2 and DeepSpeed ZeRO; the engine comes from the accelerate config:

    # 2 CPU processes, DDP over gloo (accelerate's --cpu path needs MPI; --multi_gpu is its torchrun launcher)
    accelerate launch --multi_gpu --num_processes 2 examples/distributed/train_sft.py --output outputs/ddp_hft
    # 8 GPUs
    accelerate launch --config_file examples/distributed/accelerate_fsdp2.yaml examples/distributed/train_sft.py \
        --model <path or hub id> --bf16 --output outputs/fsdp2_hft

It fine-tunes the embedded SmolLM2-135M-Instruct (or ``--model``) on the first ``--examples`` Alpaca demo examples,
saves the diff adapter (``Trainer.save_model`` and ``peft_hft.integrations.distributed.save_adapter``), and writes
what each process held for training to ``<output>/memory_<method>.json``: trainable parameters, gradient and
optimizer-state bytes, HFT's base values in host memory, and the peak memory. Run it once with ``--method full`` and
once with ``--method hft`` into the same ``--output`` to get ``memory.png`` comparing them.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

from peft_hft import HFTConfig
from peft_hft.integrations.distributed import save_adapter
from peft_hft.resources.data import alpaca_demo
from peft_hft.tuner import engines
from peft_hft.tuner.layer import find_ledger


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("hft", "full"), default="hft")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--output", default="outputs/distributed_sft")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def tokenize(tokenizer, examples: list[dict[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """Prompt and answer in one sequence, padded to max_length; the loss covers the answer only."""
    rows = []
    for ex in examples:
        prompt = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "") + "\n\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(ex["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        pad = max_length - len(ids)
        rows.append({
            "input_ids": ids + [tokenizer.pad_token_id] * pad,
            "attention_mask": [1] * len(ids) + [0] * pad,
            "labels": labels + [-100] * pad,
        })
    return rows


def local_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` this process stores (its shard under FSDP2 / ZeRO-3)."""
    if engines.is_zero3_param(param):
        return param.ds_tensor.numel()
    if engines.is_dtensor(param):
        return param.to_local().numel()
    return param.numel()


def memory_report(trainer, method: str) -> dict[str, float]:
    """What this process held for training, in MiB (gradients as the optimizer sees them, i.e. per process)."""
    mib = 2**20
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
    ledger = find_ledger(model)
    originals = sum(t.numel() * t.element_size() for t in ledger._originals.values()) if ledger is not None else 0
    report = {
        "parameters_total": sum(engines.full_numel(p) for p in model.parameters()),
        "parameters_trainable": sum(engines.full_numel(p) for p in trainable),
        "gradients_MiB_this_process": sum(local_numel(p) * p.element_size() for p in trainable) / mib,
        "optimizer_state_MiB_this_process": state_bytes / mib,
        "base_values_host_MiB_this_process": originals / mib,
        "peak_rss_MiB_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        report["peak_gpu_MiB_this_process"] = torch.cuda.max_memory_allocated() / mib
    return report


def plot(output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {m: json.loads((output / f"memory_{m}.json").read_text()) for m in ("full", "hft")}
    keys = [k for k in reports["hft"] if k.endswith("MiB_this_process")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.4
    for i, method in enumerate(("full", "hft")):
        ax.bar([j + i * width for j in range(len(keys))], [reports[method].get(k, 0) for k in keys], width,
               label="full fine-tuning" if method == "full" else "HFT")
    ax.set_xticks([j + width / 2 for j in range(len(keys))])
    ax.set_xticklabels([k.replace("_MiB_this_process", "").replace("_", " ") for k in keys], rotation=15)
    ax.set_ylabel("MiB per process")
    ax.set_title(f"Memory per process ({reports['hft'].get('engine', '')}, {reports['hft'].get('processes', '')} "
                 "processes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "memory.png", dpi=120)


def main() -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    args = parse_args()
    output = Path(args.output)
    training_args = TrainingArguments(  # first: under ZeRO-3 the model then loads partitioned
        output_dir=str(output / f"run_{args.method}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every selected tensor gets a gradient on every step
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    with training_args.main_process_first(desc="converting the default model"):
        if args.model is None:
            from peft_hft.resources.default_model import default_model_path

            model_path = str(default_model_path())
        else:
            model_path = args.model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.method == "hft":  # before the Trainer: it shards the model (FSDP2/ZeRO) when training starts
        model = get_peft_model(model, HFTConfig(seed=args.seed))
    with training_args.main_process_first(desc="loading data"):
        rows = tokenize(tokenizer, alpaca_demo()[: args.examples], args.max_length)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows)
    trainer.train()

    report = memory_report(trainer, args.method)
    report.update(engine=trainer.accelerator.distributed_type.value, processes=trainer.accelerator.num_processes,
                  final_loss=[h["loss"] for h in trainer.state.log_history if "loss" in h][-1])
    if args.method == "hft":
        trainer.save_model(str(output / "adapter"))  # Trainer's own saving (rank 0, gathered where needed)
        save_adapter(trainer.model_wrapped, output / "adapter_save_adapter")  # every process; trained tensors only
        if trainer.accelerator.is_main_process:
            report["adapter_MiB"] = (output / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    everyone = [None] * trainer.accelerator.num_processes
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(everyone, report)
    else:
        everyone = [report]
    if trainer.accelerator.is_main_process:
        merged = dict(report, per_process=everyone)
        (output / f"memory_{args.method}.json").write_text(json.dumps(merged, indent=2))
        print(json.dumps(merged, indent=2))
        if all((output / f"memory_{m}.json").exists() for m in ("full", "hft")):
            plot(output)


if __name__ == "__main__":
    main()
