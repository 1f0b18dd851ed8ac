"""Load time of an HFT adapter against the floor: reading the same file and copying its tensors into the model.

``PeftModel.from_pretrained`` of an HFT adapter reads the file through the strict reader (every tensor checked once:
names, shapes, dtypes, finiteness, the encoding's own bounds), checks the base fingerprint, wraps the selected
modules and applies the diffs. The floor for any loader of the same bytes is ``safetensors.torch.load_file`` of the
file plus one copy of every tensor into memory the model owns. Both are timed side by side in one process, rounds
interleaved, on SmolLM2-135M-Instruct (the embedded default model) with a saved adapter of its default HFT selection
(the trained tensors moved by seeded noise of a fine-tune's size):

* ``fp32``: the fp32 model, float32 diffs (the default for fp32 bases);
* ``bf16-exact``: the model in bf16, the default exact encoding of bf16 bases (``diff_encoding="exact"``).

A second reference, ``load_file`` plus a copy into *new* memory of the model's dtype, is the least a loader pays
that keeps the base values beside the tuned ones (``disable_adapter``, ``unload``, switching adapters need them): the
tuned values then need memory of their own, paid in first-touch page faults. Also timed: the HFT load with the base
check skipped (``peft_hft.skip_base_check``), to show what the fingerprint
costs. The base model is prepared outside the timed region (a deep copy per round).

For scale, PEFT's own load of a LoRA adapter of about the same size on the same fp32 model (``r=256`` on every
linear layer, 298 MiB) is timed beside them, with PEFT's default and with ``low_cpu_mem_usage=True``, against the
same floor for its own file: what any PEFT method pays beyond reading its bytes.

Rounds in one process find memory that earlier rounds freed and the allocator kept (no first-touch page faults);
a user loads an adapter once per process, into memory the process never touched. The ``first_load`` figures time
exactly that: each is one load in a new process (after the model is loaded there), contenders interleaved.

    python benchmarks/bench_load_time.py                 # results in $OUT or outputs/bench_load_time/

Writes ``load-time.json`` and ``load-time.png``; docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "outputs/bench_load_time")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def make_adapter(base: torch.nn.Module, path: Path, encoding: str | None) -> None:
    """The default HFT selection of ``base`` with every trained tensor moved as a short fine-tune moves it."""
    from peft import get_peft_model

    import peft_hft

    model = get_peft_model(copy.deepcopy(base), peft_hft.HFTConfig(ratio=0.5, seed=0, diff_encoding=encoding))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            noise = torch.randn(param.shape, generator=g) * 1e-3 * param.float().std()
            param.add_(noise.to(param.dtype))
    model.save_pretrained(path)


def floor_load(path: Path, targets: dict[str, torch.Tensor]) -> float:
    """``load_file`` of the adapter file plus a copy of every tensor into preallocated model-side memory."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    state = load_file(path / "adapter_model.safetensors")
    for name, tensor in state.items():
        targets[name].copy_(tensor)
    return time.perf_counter() - start


def fresh_floor_load(path: Path, dtype: torch.dtype) -> float:
    """``load_file`` plus a copy of every tensor into *new* memory in the model's dtype: the least any loader pays
    that keeps the base values beside the tuned ones (``disable_adapter``, ``unload``), since the tuned values then
    need memory of their own, paid in first-touch page faults."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    state = load_file(path / "adapter_model.safetensors")
    kept = [torch.empty(tensor.shape, dtype=dtype).copy_(tensor) for tensor in state.values()]
    seconds = time.perf_counter() - start
    del kept
    return seconds


def hft_load(base: torch.nn.Module, path: Path, skip_check: bool, copy_base: bool = True) -> float:
    """One timed ``from_pretrained`` onto a deep copy of ``base`` (rounds in one process), or onto ``base`` itself
    (``copy_base=False``: a first load in a new process, as a user's, whose process holds one model and no copy)."""
    import contextlib

    from peft import PeftModel

    import peft_hft

    model = copy.deepcopy(base) if copy_base else base
    gc.collect()
    with peft_hft.skip_base_check() if skip_check else contextlib.nullcontext():
        start = time.perf_counter()
        loaded = PeftModel.from_pretrained(model, path)
        seconds = time.perf_counter() - start
    del loaded, model
    return seconds


LORA_RANK = 256  # about the size of the fp32 HFT adapter of SmolLM2-135M on every linear layer


def make_lora_adapter(base: torch.nn.Module, path: Path) -> None:
    """A LoRA adapter of ``base`` on every linear layer, with non-zero B (as after training)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA_RANK, target_modules="all-linear",
                                                           init_lora_weights=False))
    model.save_pretrained(path)


def lora_load(base: torch.nn.Module, path: Path, low_cpu_mem_usage: bool, copy_base: bool = True) -> float:
    """One timed ``PeftModel.from_pretrained`` of the LoRA adapter, as :func:`hft_load` times HFT's."""
    from peft import PeftModel

    model = copy.deepcopy(base) if copy_base else base
    gc.collect()
    start = time.perf_counter()
    loaded = PeftModel.from_pretrained(model, path, low_cpu_mem_usage=low_cpu_mem_usage)
    seconds = time.perf_counter() - start
    del loaded, model
    return seconds


CONTENDERS = ("fresh_floor", "hft", "hft_no_base_check")
LORA_CONTENDERS = ("lora_fresh_floor", "lora", "lora_low_cpu_mem_usage")


def contenders(label: str) -> tuple[str, ...]:
    """What a variant times: the LoRA yardstick only beside the fp32 model, whose adapter it matches in size."""
    return CONTENDERS + (LORA_CONTENDERS if label == "fp32" else ())


def variant_base(base: torch.nn.Module, label: str) -> torch.nn.Module:
    """The model of a variant: ``fp32`` or ``bf16-exact`` (a bf16 copy; ``base`` is left as it is)."""
    return base.float() if label == "fp32" else copy.deepcopy(base).to(torch.bfloat16)


def first_load_child(label: str, contender: str) -> None:
    """In a new process: load the model, then time one load of ``contender`` (what a user's first load costs)."""
    from peft_hft.resources.default_model import load_default_model

    base = variant_base(load_default_model()[0], label)
    path = OUT / f"adapter-{label}"
    if contender == "fresh_floor":
        seconds = fresh_floor_load(path, next(base.parameters()).dtype)
    elif contender == "lora_fresh_floor":
        seconds = fresh_floor_load(OUT / "adapter-lora", next(base.parameters()).dtype)
    elif contender.startswith("lora"):
        seconds = lora_load(base, OUT / "adapter-lora", contender == "lora_low_cpu_mem_usage", copy_base=False)
    else:
        seconds = hft_load(base, path, skip_check=contender == "hft_no_base_check", copy_base=False)
    print(json.dumps({"seconds": seconds}))


def first_loads(label: str) -> dict[str, list[float]]:
    """``ROUNDS`` first loads of every contender, each in a new process, interleaved."""
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {c: [] for c in contenders(label)}
    for _ in tqdm(range(ROUNDS), desc=f"first loads in new processes ({label})"):
        for contender in contenders(label):
            out = subprocess.run([sys.executable, __file__, "--first-load-child", label, contender], check=True,
                                 capture_output=True, text=True).stdout
            times[contender].append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return times


def measure(label: str, base: torch.nn.Module, encoding: str | None) -> dict:
    from tqdm.auto import tqdm

    path = OUT / f"adapter-{label}"
    if not (path / "adapter_model.safetensors").exists():
        make_adapter(base, path, encoding)
    lora = label == "fp32"
    if lora and not (OUT / "adapter-lora" / "adapter_model.safetensors").exists():
        make_lora_adapter(base, OUT / "adapter-lora")
    targets = preallocated(path)
    lora_targets = preallocated(OUT / "adapter-lora") if lora else {}
    size = (path / "adapter_model.safetensors").stat().st_size
    dtype = next(base.parameters()).dtype
    rounds = {"floor": lambda: floor_load(path, targets), "fresh_floor": lambda: fresh_floor_load(path, dtype),
              "hft": lambda: hft_load(base, path, False), "hft_no_base_check": lambda: hft_load(base, path, True)}
    if lora:
        lora_path = OUT / "adapter-lora"
        rounds |= {"lora_floor": lambda: floor_load(lora_path, lora_targets),
                   "lora_fresh_floor": lambda: fresh_floor_load(lora_path, dtype),
                   "lora": lambda: lora_load(base, lora_path, False),
                   "lora_low_cpu_mem_usage": lambda: lora_load(base, lora_path, True)}
    for run in rounds.values():  # warm-up: the files in the page cache, allocator warm, for every contender alike
        run()
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in tqdm(range(ROUNDS), desc=f"load time ({label})"):
        for name, run in rounds.items():
            times[name].append(run())
    median = {k: statistics.median(v) for k, v in times.items()}
    first = first_loads(label)
    first_median = {k: statistics.median(v) for k, v in first.items()}
    result = {"adapter_bytes": size, "tensors": len(targets), "seconds": times, "median_seconds": median,
              "first_load_seconds": first, "first_load_median_seconds": first_median,
              "first_load_hft_over_fresh_floor": first_median["hft"] / first_median["fresh_floor"],
              "first_load_hft_no_base_check_over_fresh_floor":
                  first_median["hft_no_base_check"] / first_median["fresh_floor"],
              "hft_over_floor": median["hft"] / median["floor"],
              "hft_no_base_check_over_floor": median["hft_no_base_check"] / median["floor"],
              "hft_over_fresh_floor": median["hft"] / median["fresh_floor"],
              "hft_no_base_check_over_fresh_floor": median["hft_no_base_check"] / median["fresh_floor"]}
    if lora:
        result["lora"] = {
            "rank": LORA_RANK, "adapter_bytes": (OUT / "adapter-lora" / "adapter_model.safetensors").stat().st_size,
            "tensors": len(lora_targets),
            **{f"{k}_over_floor": median[k] / median["lora_floor"] for k in ("lora", "lora_low_cpu_mem_usage")},
            **{f"first_load_{k}_over_fresh_floor": first_median[k] / first_median["lora_fresh_floor"]
               for k in ("lora", "lora_low_cpu_mem_usage")},
        }
    return result


def preallocated(path: Path) -> dict[str, torch.Tensor]:
    """Memory for every tensor of the adapter file at ``path``: where the floor copies to."""
    from safetensors import safe_open

    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return {name: torch.empty_like(f.get_tensor(name)) for name in f.keys()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = results["variants"]["fp32"]
    m = fp32["median_seconds"]
    groups = [(f"HFT {v}", r["median_seconds"], r, ("floor", "fresh_floor", "hft", "hft_no_base_check"))
              for v, r in results["variants"].items()]
    groups.append((f"PEFT LoRA r={fp32['lora']['rank']}, fp32", m,
                   {"adapter_bytes": fp32["lora"]["adapter_bytes"], "hft_over_floor": fp32["lora"]["lora_over_floor"],
                    "hft_over_fresh_floor": m["lora"] / m["lora_fresh_floor"]},
                   ("lora_floor", "lora_fresh_floor", "lora", "lora_low_cpu_mem_usage")))
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    width = 0.2
    names = [("load_file + copy (floor)", "lightgray"), ("load_file + copy into new memory", "darkgray"),
             ("PeftModel.from_pretrained", "tab:blue"),
             ("... skip_base_check (HFT) / low_cpu_mem_usage=True (LoRA)", "tab:cyan")]
    for k, (name, color) in enumerate(names):
        values = [medians[keys[k]] for _, medians, _, keys in groups]
        bars = ax.bar([i + (k - 1.5) * width for i in range(len(groups))], values, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.2f s", fontsize=7)
    for i, (_, _, r, _) in enumerate(groups):
        ax.annotate(f"{r['hft_over_floor']:.1f}x the floor, {r['hft_over_fresh_floor']:.1f}x with new memory", (i, 0),
                    xytext=(0, -28), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{label}\n({r['adapter_bytes'] / 2**20:.0f} MiB)" for label, _, r, _ in groups],
                  fontsize=8)
    ax.set_ylabel("seconds (median)")
    ax.set_title("Loading SmolLM2-135M adapters vs reading and copying their files (one process)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from peft_hft.resources.default_model import load_default_model

    OUT.mkdir(parents=True, exist_ok=True)
    base, _ = load_default_model()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__},
               "rounds": ROUNDS, "variants": {}}
    results["variants"]["fp32"] = measure("fp32", variant_base(base, "fp32"), None)
    results["variants"]["bf16-exact"] = measure("bf16-exact", variant_base(base, "bf16-exact"), "exact")
    (OUT / "load-time.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, OUT / "load-time.png")
    print(f"{'':12}{'adapter MiB':>12}{'floor s':>9}{'new-mem s':>10}{'HFT s':>8}{'no check s':>11}{'HFT/floor':>10}"
          f"{'HFT/new-mem':>12}")
    for label, r in results["variants"].items():
        m = r["median_seconds"]
        print(f"{label:12}{r['adapter_bytes'] / 2**20:12.1f}{m['floor']:9.3f}{m['fresh_floor']:10.3f}{m['hft']:8.3f}"
              f"{m['hft_no_base_check']:11.3f}{r['hft_over_floor']:9.2f}x{r['hft_over_fresh_floor']:11.2f}x")
    print("first load in a new process (medians):")
    for label, r in results["variants"].items():
        m = r["first_load_median_seconds"]
        print(f"{label:12}new-mem {m['fresh_floor']:.3f} s, HFT {m['hft']:.3f} s "
              f"({r['first_load_hft_over_fresh_floor']:.2f}x), no check {m['hft_no_base_check']:.3f} s "
              f"({r['first_load_hft_no_base_check_over_fresh_floor']:.2f}x)")
    lora = results["variants"]["fp32"]["lora"]
    m, f = results["variants"]["fp32"]["median_seconds"], results["variants"]["fp32"]["first_load_median_seconds"]
    print(f"PEFT's LoRA r={lora['rank']} on the fp32 model ({lora['adapter_bytes'] / 2**20:.1f} MiB): floor "
          f"{m['lora_floor']:.3f} s, from_pretrained {m['lora']:.3f} s ({lora['lora_over_floor']:.2f}x), "
          f"low_cpu_mem_usage {m['lora_low_cpu_mem_usage']:.3f} s ({lora['lora_low_cpu_mem_usage_over_floor']:.2f}x); "
          f"first load: new-mem {f['lora_fresh_floor']:.3f} s, {f['lora']:.3f} s "
          f"({lora['first_load_lora_over_fresh_floor']:.2f}x), low_cpu_mem_usage {f['lora_low_cpu_mem_usage']:.3f} s "
          f"({lora['first_load_lora_low_cpu_mem_usage_over_fresh_floor']:.2f}x)")
    print(f"wrote {OUT / 'load-time.json'} and {OUT / 'load-time.png'}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--first-load-child":
        first_load_child(sys.argv[2], sys.argv[3])
    else:
        main()
