"""Peak memory of DPO with HFT (no second model) against full fine-tuning DPO with a reference model copy.

Every variant is one run of ``examples/dpo_hft.py`` in a fresh process (``--skip-eval``, a few steps, same data, same
seed), so the numbers are the example's own: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``, from
trainer construction to the end of training); on the CPU the process's peak resident set minus its resident set after
the imports (``baseline_rss_mib``), i.e. model, reference, optimizer, activations and allocator slack. Next to each
measurement is the model-state arithmetic (weights, reference, gradients, AdamW moments; no activations).

Variants:
  fft_ref_copy          full fine-tuning, the reference is a second model (TRL's default without PEFT)
  fft_precompute        full fine-tuning, reference log-probs computed once before training (no second model)
  hft_disable           HFT, reference through disable_adapter() at every step, originals in host memory (default)
  hft_disable_device    HFT, as above with HFTConfig(originals_device="device"): originals beside the weights
  hft_precompute        HFT, reference log-probs computed once before training

Usage::

    python benchmarks/bench_dpo_memory.py                       # all variants, 3 steps each
    python benchmarks/bench_dpo_memory.py --steps 5 --output-dir $OUT/dpo_memory

Prints a table and the ratio HFT-DPO / FFT-DPO-with-reference-copy, and writes ``dpo_memory.json`` and
``dpo_memory.png`` to the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dpo_hft.py"
VARIANTS: dict[str, list[str]] = {
    "fft_ref_copy": ["--method", "fft"],
    "fft_precompute": ["--method", "fft", "--reference", "precompute"],
    "hft_disable": ["--method", "hft"],
    "hft_disable_device": ["--method", "hft", "--originals-device", "device"],
    "hft_precompute": ["--method", "hft", "--reference", "precompute"],
}
BASELINE, CANDIDATE = "fft_ref_copy", "hft_disable"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model", default=None, help="a local model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output-dir", default=os.environ.get("OUT", "benchmarks/results"))
    return p.parse_args(argv)


def run_variant(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / name
    command = [sys.executable, str(EXAMPLE), *VARIANTS[name], "--skip-eval", "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--output-dir", str(out)]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"variant {name} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    return json.loads((out / "results.json").read_text())["train"]


def model_state_mib(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Bytes of weights, reference, gradients and AdamW moments per variant (fp32), from the model's sizes."""
    sys.path.insert(0, str(ROOT / "examples"))
    from _common import load_model_and_tokenizer
    from peft import get_peft_model

    from peft_hft import HFTConfig

    model, _ = load_model_and_tokenizer(args.model)
    total = sum(p.numel() for p in model.parameters())
    trained = get_peft_model(model, HFTConfig(seed=0)).get_nb_trainable_parameters()[0]
    mib = 4 / 2**20  # fp32 bytes per parameter, in MiB
    return {  # device: what sits beside the weights; host: HFT's originals when kept off the device
        "fft_ref_copy": {"device": (total + total + total + 2 * total) * mib, "host": 0.0},
        "fft_precompute": {"device": (total + total + 2 * total) * mib, "host": 0.0},
        "hft_disable": {"device": (total + trained + 2 * trained) * mib, "host": trained * mib},
        "hft_disable_device": {"device": (total + trained + 3 * trained) * mib, "host": 0.0},
        "hft_precompute": {"device": (total + trained + 2 * trained) * mib, "host": trained * mib},
        "_sizes": {"parameters": total, "hft_trained_parameters": trained},
    }


def measured_mib(result: dict) -> float:
    if "peak_cuda_allocated_mib" in result:
        return result["peak_cuda_allocated_mib"]
    return result["peak_rss_mib"] - result["baseline_rss_mib"]


def plot(results: dict, path: Path, unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.barh(names, [results[n]["measured_mib"] for n in names],
                   color=["#c44e52" if n.startswith("fft") else "#4c72b0" for n in names])
    ax.bar_label(bars, fmt="%.0f MiB", padding=3)
    ax.invert_yaxis()
    ax.set_xlabel(f"peak memory ({unit}), MiB")
    ax.set_title("DPO peak memory: HFT (blue) vs full fine-tuning (red)")
    ax.margins(x=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="dpo-memory-") as tmp:
        for name in tqdm(args.variants, desc="DPO variants"):
            runs[name] = run_variant(name, args, Path(tmp))
    # Only now load the model here: a child's peak RSS starts at the parent's resident size when it was forked.
    expected = model_state_mib(args)
    results = {
        name: {"measured_mib": round(measured_mib(train), 1), "seconds": train["seconds"],
               "model_state_mib": {k: round(v, 1) for k, v in expected[name].items()}, "raw": train}
        for name, train in runs.items()
    }
    device = next(iter(results.values()))["raw"]["device"]
    on_cuda = "peak_cuda_allocated_mib" in next(iter(results.values()))["raw"]
    unit = "CUDA allocated" if on_cuda else "RSS above baseline"
    print(f"\nDPO peak memory on {device} ({unit}); {args.steps} steps, batch {args.batch_size} pairs, "
          f"max_length {args.max_length}; model: {args.model or 'SmolLM2-135M-Instruct'}")
    print(f"  {'variant':<20}{'measured MiB':>14}{'model state MiB (device + host)':>34}{'seconds':>10}")
    for name, r in results.items():
        state = r["model_state_mib"]
        line = f"{r['measured_mib']:>14.0f}{state['device']:>22.0f} + {state['host']:<9.0f}{r['seconds']:>10}"
        print(f"  {name:<20}{line}")
    summary = {"device": device, "unit": unit, "args": vars(args), "sizes": expected["_sizes"], "variants": results}
    if BASELINE in results and CANDIDATE in results:
        ratio = results[CANDIDATE]["measured_mib"] / results[BASELINE]["measured_mib"]
        summary["ratio_hft_disable_over_fft_ref_copy"] = round(ratio, 3)
        print(f"\nHFT-DPO / FFT-DPO with a reference copy: {ratio:.2f}x peak memory ({unit})")
    (output / "dpo_memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, output / "dpo_memory.png", unit)
    print(f"wrote {output / 'dpo_memory.json'} and {output / 'dpo_memory.png'}")
    return summary


if __name__ == "__main__":
    main()
