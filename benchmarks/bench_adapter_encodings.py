"""Measured error of the adapter encodings (docs/adapter-format.md, "Encodings: measured error").

SmolLM2-135M-Instruct in **bf16** (weights bf16, fp32 master values), HFT (ratio 0.5) trained with the forgetting
benchmark's completion setting (sarcasm, compact prompts, 100 AdamW steps of 8, lr 3e-4, loss on the answer only,
warm-up 10% then linear decay), one run per seed. Each seed's adapter is saved once with ``diff_encoding="float"``
(fp32 diffs that carry the masters: the uncompressed reference), then re-encoded with ``peft_hft.ops.compress`` into
every encoding, and each encoded adapter is loaded onto the bf16 base and scored: new-task test accuracy and Wikipedia
perplexity (the forgetting benchmark's lm-eval sets), the mean per-token KL divergence to the uncompressed adapter on
held-out text, bytes on disk, load time and ``peft-hft merge`` time.

    python benchmarks/bench_adapter_encodings.py train   # trains and saves the reference adapters (cached)
    python benchmarks/bench_adapter_encodings.py eval    # encodes, scores, writes results.json and a PNG

Results go to $OUT (default outputs/bench_adapter_encodings/); SEEDS (default "0,1,2") picks the seeds.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "outputs/bench_adapter_encodings")
SEEDS = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]
LR = 3e-4
ENCODINGS = ["float", "exact", "int8", "int4", "dare:0.9", "dare:0.99", "sign"]


def protocol():
    from peft_hft.bench.protocol import Protocol

    return Protocol(methods=["hft"], seeds=SEEDS, loss="completion", full_lr_grid=[LR], retention=["wikipedia"],
                    retention_limits={"wikipedia": 150})


def bench():
    from peft_hft.bench.runner import prepare

    b = prepare(protocol(), OUT / "bench", device="cpu")
    b.base_model.to(torch.bfloat16)
    return b


def train_phase() -> None:
    from peft_hft.bench.newtask import training_batches
    from peft_hft.bench.train import train

    b = bench()
    method = b.methods[0]
    p = b.protocol
    for seed in SEEDS:
        target = OUT / f"seed{seed}" / "float"
        if (target / "adapter_config.json").is_file():
            continue
        torch.manual_seed(seed)
        model = method.wrap(copy.deepcopy(b.base_model), seed)
        model.peft_config["default"].diff_encoding = "float"
        batches = training_batches(b.task, b.tokenizer, p.batch_size, p.steps, seed, p.loss, p.max_length)
        record = train(model, batches, LR, warmup=p.warmup, precision="bf16", desc=f"hft seed {seed}")
        model.save_pretrained(target)
        (OUT / f"seed{seed}" / "train.json").write_text(json.dumps(record) + "\n")
        print(f"seed {seed}: trained in {record['seconds']:.0f} s, final loss {record['loss'][-1]:.3f}", flush=True)


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else "train"
    if phase == "train":
        train_phase()
    else:
        from importlib import import_module  # noqa: F401 - the eval phase lives below once written

        eval_phase()  # noqa: F821
