"""Step time and peak memory of HFT against plain freezing and full fine-tuning, measured side by side in one run.

Variants, all on the same model, data and optimizer (AdamW over the trainable tensors):

* ``freeze``  -- the ideal: the tensors HFT selects get ``requires_grad=True``, everything else ``False``; no PEFT.
* ``hft``     -- ``get_peft_model(model, HFTConfig())``: the package's default mode (in-place training; the originals
  are kept in host memory, reported separately).
* ``fft``     -- full fine-tuning.
* ``delta``   -- the alternative representation, for the record: frozen base weights plus zero-initialised delta
  parameters of the selected block tensors, applied as ``W + delta`` through ``torch.nn.utils.parametrize`` (the
  tied embedding is trained in place, as in ``hft``).

With ``--dtype bfloat16``/``float16`` (the model loaded in that dtype) the default variants change to the ones that
matter for half precision (docs/concepts.md, "Precision"):

* ``hft``           -- the default: bf16 weights, master values of the trained half as the bf16 weight and the lower
  half of the fp32 bit pattern (``master_weights="kahan"``, 2 bytes);
* ``hft-fp32``      -- ``HFTConfig(master_weights="fp32")``: a separate fp32 master (4 bytes), the same values;
* ``hft-offload``   -- ``HFTConfig(master_weights="fp32_offload")``: that master and AdamW's state in host memory,
  stepped there (the offloaded preset's masters; on a CPU-only machine host and device are one memory, so only CUDA
  shows what the copies and the host's step cost);
* ``hft-sr``        -- ``HFTConfig(master_weights="stochastic_rounding")``: no buffer, stochastic rounding;
* ``hft-nomaster``  -- ``HFTConfig(master_weights="none")``: updates written straight into bf16 weights;
* ``hft-bwd``       -- the default masters, with the optimizer step fused into backward (``optimizer_in_backward``);
* ``hft-preset``    -- ``low_memory_preset()``: stochastic rounding, torchao AdamW4bit, step fused into backward
  (gradient checkpointing as well only with ``--gradient-checkpointing``, which then applies to every variant);
* ``freeze``        -- plain ``requires_grad`` freezing in bf16 (no masters);
* ``fft``           -- pure bf16 full fine-tuning (no masters);
* ``fft-amp``       -- full fine-tuning with fp32 master weights, the usual mixed precision: the model in fp32, the
  forward and backward under ``torch.autocast(dtype=bf16)`` (what ``Trainer(bf16=True)`` does with an fp32 model);
* ``lora``          -- PEFT LoRA (r=16, every linear layer of the blocks), whose weights PEFT keeps in fp32.

``--quality-steps N`` also trains every variant N steps from the same start on the same batches and reports the
held-out loss after them (the last tenth of the text), against the default ``hft``.

Step times are interleaved round by round (the machines are noisy) and summarised by their median. Peak memory is
measured per variant in isolation (a fresh subprocess per variant on the CPU) with ``benchmarks/memory.py``: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU malloc's allocated bytes sampled after every PyTorch operation. HFT's
store of original values lives in host memory and is reported on its own line, not in the peak.

Usage::

    python benchmarks/bench_training.py                       # CPU, SmolLM2-135M-Instruct, fp32
    python benchmarks/bench_training.py --device cuda --dtype bfloat16 --batch-size 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import PeakMemory  # noqa: E402

VARIANTS = ("freeze", "hft", "fft", "delta")
LOW_PRECISION_VARIANTS = ("freeze", "hft", "hft-fp32", "hft-offload", "hft-sr", "hft-nomaster", "hft-bwd",
                          "hft-preset", "fft", "fft-amp", "lora")
# variant -> HFTConfig(master_weights=...); None: the default
MASTER_VARIANTS = {"hft": None, "hft-fp32": "fp32", "hft-offload": "fp32_offload", "hft-sr": "stochastic_rounding",
                   "hft-nomaster": "none", "hft-bwd": None}
AUTOCAST_VARIANTS = ("fft-amp",)  # fp32 model, low-precision compute
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8, help="measured steps per variant (interleaved)")
    p.add_argument("--variants", default=None,
                   help=f"default: {','.join(VARIANTS)}; in bf16/fp16: {','.join(LOW_PRECISION_VARIANTS)}")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-memory", action="store_true",
                   help="step times only (the CPU peak-memory sampler is slow in bf16); HFT's master and originals "
                        "bytes are still reported")
    p.add_argument("--quality-steps", type=int, default=0,
                   help="also train each variant this many steps and report the held-out loss (0: skip)")
    p.add_argument("--eager-optimizer", action="store_true",
                   help="torchao's step without torch.compile (torch.compiler.set_stance('force_eager'))")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results"), help="directory for JSON and PNG")
    p.add_argument("--tag", default=None, help="name of the result files (default: <device>-<dtype>)")
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)  # internal: one variant in a subprocess
    return p.parse_args(argv)


def make_batches(tokenizer, batch_size: int, seq_len: int, count: int, device) -> list[dict[str, torch.Tensor]]:
    """Real text (llamafactory's Alpaca demo), packed into full-length sequences."""
    from peft_hft.resources.data import alpaca_demo

    text = "\n\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in alpaca_demo())
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = batch_size * seq_len
    batches = []
    for i in range(count):
        chunk = ids[(i * need) % (len(ids) - need):][:need].view(batch_size, seq_len).to(device)
        batches.append({"input_ids": chunk, "labels": chunk})
    return batches


class AddDelta(nn.Module):
    """Parametrization ``W -> W + delta`` with a trainable, zero-initialised delta."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, weight):
        return weight + self.delta


def build(variant: str, args, selection: list[str]):
    """Model + optimizer for one variant."""
    from peft import get_peft_model
    from torch.nn.utils import parametrize

    from peft_hft import HFTConfig
    from peft_hft.resources.default_model import load_default_model

    dtype = torch.float32 if variant in AUTOCAST_VARIANTS else getattr(torch, args.dtype)
    model, _ = load_default_model(dtype=dtype, device=args.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    if variant in MASTER_VARIANTS:
        model = get_peft_model(model, HFTConfig(master_weights=MASTER_VARIANTS[variant]))
    elif variant == "hft-preset":
        from peft_hft import low_memory_config

        model = get_peft_model(model, low_memory_config())
    elif variant == "lora":
        from peft import LoraConfig

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    elif variant in ("fft", "fft-amp"):
        model.requires_grad_(True)
    elif variant == "freeze":
        model.requires_grad_(False)
        for name in selection:
            model.get_parameter(name).requires_grad_(True)
    elif variant == "delta":
        model.requires_grad_(False)
        tied = {id(model.get_input_embeddings().weight)}
        for name in selection:
            param = model.get_parameter(name)
            module_name, _, attr = name.rpartition(".")
            if id(param) in tied or attr != "weight":
                param.requires_grad_(True)
            else:
                parametrize.register_parametrization(model.get_submodule(module_name), attr, AddDelta(param))
    model.train()
    if variant == "hft-bwd":
        from peft_hft import optimizer_in_backward

        return model, optimizer_in_backward(model, torch.optim.AdamW, lr=1e-5)
    if variant == "hft-preset":
        from peft_hft import apply_low_memory_preset

        return model, apply_low_memory_preset(model, lr=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    return model, optimizer


def step(model, optimizer, batch, autocast: Optional[torch.dtype] = None) -> None:
    """One AdamW step; ``autocast`` runs forward and backward in that dtype (mixed precision on an fp32 model)."""
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hft_selection(args) -> list[str]:
    from peft_hft import HFTConfig
    from peft_hft.resources.default_model import load_default_model
    from peft_hft.tuner.selection import resolve_selection

    model, _ = load_default_model()
    return resolve_selection(model, HFTConfig())


def originals_bytes(model) -> int:
    from peft_hft.tuner.layer import find_ledger

    ledger = find_ledger(model)
    return 0 if ledger is None else sum(ledger.originals_bytes().values())


def master_bytes(model) -> int:
    from peft_hft import memory_report
    from peft_hft.tuner.layer import find_ledger

    return 0 if find_ledger(model) is None else memory_report(model)["master_bytes"]


def autocast_of(variant: str, args) -> Optional[torch.dtype]:
    return getattr(torch, args.dtype) if variant in AUTOCAST_VARIANTS and args.dtype != "float32" else None


def measure_memory(variant: str, args, selection, batches) -> dict:
    """Peak training memory of one variant (weights, gradients, optimizer state, activations).

    The originals HFT keeps for diffs are in host memory: on CUDA they are not device memory anyway; on the CPU they
    share the memory with the weights, so they are subtracted and reported on their own.
    """
    model, optimizer = build(variant, args, selection)
    store = originals_bytes(model)
    autocast = autocast_of(variant, args)
    step(model, optimizer, batches[0], autocast)  # optimizer state (and HFT's fp32 masters) exist from step 1 on
    gc.collect()
    with PeakMemory(args.device) as peak:
        for batch in batches[1:3]:
            step(model, optimizer, batch, autocast)
    on_cpu = not args.device.startswith("cuda")
    return {
        "variant": variant,
        "peak_bytes": peak.peak - (store if on_cpu else 0),
        "originals_store_bytes": store,
        "master_bytes": master_bytes(model),  # part of the peak: on the training device
        "store_location": "host memory" + (" (subtracted from the CPU peak)" if on_cpu else ""),
    }


def held_out_loss_after(variant: str, args, selection, tokenizer) -> float:
    """Held-out loss of one variant after ``--quality-steps`` steps on the packed Alpaca text (bench_precision's)."""
    from bench_precision import held_out_loss, packed_text

    model, optimizer = build(variant, args, selection)
    train_rows, eval_rows = packed_text(tokenizer, args.seq_len)
    for i in tqdm(range(args.quality_steps), desc=f"Quality {variant}", leave=False):
        start = (i * args.batch_size) % (len(train_rows) - args.batch_size)
        ids = train_rows[start: start + args.batch_size].to(args.device)
        step(model, optimizer, {"input_ids": ids, "labels": ids}, autocast_of(variant, args))
    return held_out_loss(model, eval_rows[:8], args.device)


def memory_in_subprocess(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--memory-only", variant]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.eager_optimizer:
        torch.compiler.set_stance("force_eager")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    default = LOW_PRECISION_VARIANTS if args.dtype != "float32" else VARIANTS
    variants = [v for v in (args.variants or ",".join(default)).split(",") if v]
    from peft_hft.resources.default_model import load_default_model

    _, tokenizer = load_default_model()
    batches = make_batches(tokenizer, args.batch_size, args.seq_len, max(3, args.warmup + args.rounds), args.device)
    selection = hft_selection(args)

    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args, selection, batches)))
        return

    # Memory: each variant alone (a subprocess per variant on CPU, where peak RSS cannot be reset).
    memory = {}
    for variant in tqdm([] if args.no_memory else variants, desc="Peak memory"):
        if args.device == "cpu":
            memory[variant] = memory_in_subprocess(variant, [a for a in argv if a != "--memory-only"])
        else:
            memory[variant] = measure_memory(variant, args, selection, batches)
            gc.collect()
            torch.cuda.empty_cache()

    # Time: all variants alive, steps interleaved round by round.
    built = {v: build(v, args, selection) for v in variants}
    for i in range(args.warmup):
        for v in variants:
            step(*built[v], batches[i], autocast_of(v, args))
    times = {v: [] for v in variants}
    for r in tqdm(range(args.rounds), desc="Interleaved steps"):
        for v in variants:
            sync(args.device)
            start = time.perf_counter()
            step(*built[v], batches[args.warmup + r], autocast_of(v, args))
            sync(args.device)
            times[v].append(time.perf_counter() - start)

    trainable = {v: sum(p.numel() for p in built[v][0].parameters() if p.requires_grad) for v in variants}
    if args.no_memory:
        memory = {v: {"variant": v, "peak_bytes": float("nan"), "originals_store_bytes": originals_bytes(built[v][0]),
                      "store_location": "host memory", "master_bytes": master_bytes(built[v][0])} for v in variants}
    total = sum(p.numel() for p in built["fft" if "fft" in built else variants[0]][0].parameters())
    median = {v: statistics.median(times[v]) for v in variants}
    result = {
        "machine": {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "args": {k: v for k, v in vars(args).items() if k != "memory_only"},
        "median_step_s": median,
        "step_s": times,
        "memory": memory,
        "trainable_params": trainable,
        "total_params": total,
    }
    if args.quality_steps:
        del built
        gc.collect()
        result["held_out_loss"] = {v: held_out_loss_after(v, args, selection, tokenizer) for v in variants}
    ratios = {}
    pairs = [("hft", o) for o in ("freeze", "fft", "hft-nomaster", "fft-amp", "lora")] + [("delta", "freeze")]
    pairs += [(v, "hft") for v in ("hft-fp32", "hft-offload", "hft-sr", "hft-bwd", "hft-preset")]
    for a, b in pairs:
        if a in median and b in median:
            ratios[f"step_time {a}/{b}"] = median[a] / median[b]
            if not args.no_memory:
                ratios[f"peak_memory {a}/{b}"] = memory[a]["peak_bytes"] / memory[b]["peak_bytes"]
    result["ratios"] = ratios

    print(f"\nSmolLM2-135M-Instruct, {args.device} {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens")
    print(f"{'variant':<14}{'trainable':>14}{'median step (s)':>18}{'peak memory (MiB)':>20}")
    for v in variants:
        print(f"{v:<14}{trainable[v]:>14,}{median[v]:>18.3f}{memory[v]['peak_bytes'] / 2**20:>20.1f}")
    if "hft" in memory:
        print(f"HFT originals store ({memory['hft']['store_location']}): "
              f"{memory['hft']['originals_store_bytes'] / 2**20:.1f} MiB; master values (in the peak): "
              f"{memory['hft']['master_bytes'] / 2**20:.1f} MiB")
    for name, value in ratios.items():
        print(f"{name:<28}{value:.3f}")
    for v, loss in result.get("held_out_loss", {}).items():
        print(f"held-out loss after {args.quality_steps} steps, {v:<14}{loss:.4f}")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{'cuda' if args.device.startswith('cuda') else 'cpu'}-{args.dtype}"
    (out / f"training-{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"training-{tag}.png")
    print(f"wrote {out / f'training-{tag}.json'} and .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["median_step_s"])
    base_t = result["median_step_s"].get("freeze") or 1.0
    base_m = result["memory"].get("freeze", {}).get("peak_bytes") or 1
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(variants)), 3.6), dpi=120)
    axes[0].bar(variants, [result["median_step_s"][v] / base_t for v in variants], color="#1f77b4")
    axes[0].set_title("median step time / freeze")
    axes[1].bar(variants, [result["memory"][v]["peak_bytes"] / base_m for v in variants], color="#ff7f0e")
    axes[1].set_title("peak training memory / freeze")
    for ax in axes:
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.05, color="grey", linewidth=0.8, linestyle="--")
    fig.suptitle(f"SmolLM2-135M, {result['args']['device']} {result['args']['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
