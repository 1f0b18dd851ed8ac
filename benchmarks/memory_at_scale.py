"""The README's "Memory at scale" table: ``estimate-memory`` on the published shapes in ``benchmarks/model_configs``.

Nothing is loaded or downloaded: each model is built from its ``config.json`` on the meta device.

Usage::

    python benchmarks/memory_at_scale.py            # batch 1 x 2048 tokens, gradient checkpointing, bf16 weights
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "model_configs"
MODELS = ("Llama-3.2-1B", "Llama-3.2-3B", "Meta-Llama-3-8B", "Qwen2.5-7B")
METHODS = ("fft", "hft", "hft-low-memory", "hft-low-memory-offload", "lora", "freeze")


def main(argv=None) -> None:
    from peft_hft import estimate_memory
    from peft_hft.ops.estimate_memory import GiB

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    header = ("| model | parameters | HFT trains | FFT | HFT (default) | HFT / FFT | HFT low-memory preset | "
              "offloaded preset (host memory) | LoRA r16, all linear | plain freezing |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODELS:
        e = estimate_memory(CONFIGS / name, batch_size=args.batch_size, seq_len=args.seq_len,
                            gradient_checkpointing=True, methods=list(METHODS)).methods
        hft = e["hft"]
        share = hft.trainable_parameters / hft.total_parameters
        gib = {k: f"{m.total_bytes / GiB:.1f} GiB" for k, m in e.items()}
        print(f"| {name} | {hft.total_parameters / 1e9:.2f}B | {100 * share:.0f}% | {gib['fft']} | {gib['hft']} | "
              f"{hft.total_bytes / e['fft'].total_bytes:.2f} | {gib['hft-low-memory']} | "
              f"{gib['hft-low-memory-offload']} ({e['hft-low-memory-offload'].host_bytes / GiB:.1f} GiB) | "
              f"{gib['lora']} | {gib['freeze']} |", flush=True)


if __name__ == "__main__":
    main()
