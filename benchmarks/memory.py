"""Peak memory of a block of PyTorch work, on CUDA or on the CPU, and of a training step per method.

CUDA has ``torch.cuda.max_memory_allocated``. The CPU has no such counter, and the peak resident set size of a
process also counts start-up and model loading. Instead, ``PeakMemory`` samples the bytes currently allocated by
glibc's malloc (``mallinfo2``: arena plus mmapped chunks, over all threads) after every PyTorch operation, through a
``TorchDispatchMode``; the maximum is the peak to operator granularity. Sampling slows the work down, so measure
memory and time in separate runs.

Intel MKL (torch's CPU BLAS) keeps the scratch buffers of its matrix products allocated for reuse, which the
sampler counts as held memory (tens of MB on a small model, growing with the matrices). Set
``MKL_DISABLE_FAST_MM=1`` before the process starts to measure what the training state itself needs;
``python benchmarks/memory.py`` does so by re-executing itself.

``python benchmarks/memory.py [--model DIR] [--dtype bfloat16] [--gradient-checkpointing]`` measures the peak of one
training step of each method in :data:`TRAINING_VARIANTS` and puts it beside ``peft-hft estimate-memory``'s
estimate (the default model is the embedded SmolLM2-135M-Instruct: run it under the shared lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def cpu_allocated_bytes() -> int:
    """Bytes currently allocated through malloc in this process (all arenas plus mmapped chunks)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory(TorchDispatchMode):
    """Context manager recording the peak allocated bytes on ``device`` while it is active.

    ``peak`` is absolute (all memory the process holds on that device), so compare variants run in the same way.
    """

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.peak = 0

    def _now(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.memory_allocated()
        return cpu_allocated_bytes()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.peak = torch.cuda.max_memory_allocated()
            return self  # CUDA keeps its own peak; no sampling needed
        self.peak = self._now()
        return super().__enter__()

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            return False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._now())
        return out


# ------------------------------------------------------------------------------------------------------------------
# The peak of one training step, per method: what `peft-hft estimate-memory` is tested against
# ------------------------------------------------------------------------------------------------------------------

LORA_TARGETS = "all-linear"


def _hft(model, **config):
    from peft import get_peft_model

    from peft_hft import HFTConfig

    return get_peft_model(model, HFTConfig(**config))


def _fft(model):
    """Full fine-tuning; a bf16/fp16 model gets fp32 masters of every tensor (HFT with ratio 1 is exactly that)."""
    if model.dtype in (torch.bfloat16, torch.float16):
        return _hft(model, ratio=1.0, master_weights="fp32")
    return model.requires_grad_(True)


def _freeze(model):
    from peft_hft import HFTConfig
    from peft_hft.tuner.selection import resolve_selection

    selection = resolve_selection(model, HFTConfig())
    model.requires_grad_(False)
    for name in selection:
        model.get_parameter(name).requires_grad_(True)
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))


def _hft_nf4_frozen(model):
    from peft_hft import quantize_frozen

    model = _hft(model)
    quantize_frozen(model)
    return model


def fused_adamw(params):
    """transformers' default optimizer (``optim="adamw_torch_fused"``): no temporaries in the step."""
    return torch.optim.AdamW(params, lr=1e-5, fused=True)


def adamw_in_backward(params):
    """The step fused into backward (``peft_hft.optimizer_in_backward``), each tensor with its own fused AdamW."""
    from peft_hft import OptimizerInBackward

    return OptimizerInBackward(params, torch.optim.AdamW, lr=1e-5, fused=True)


# The slice size of the preset's step (``--chunk-elements``; None: the preset's own, low_memory_preset()).
PRESET_CHUNK_ELEMENTS: dict[str, Optional[int]] = {"override": None}


def preset_chunk_elements() -> int:
    from peft_hft import low_memory_preset

    override = PRESET_CHUNK_ELEMENTS["override"]
    return low_memory_preset()["chunk_elements"] if override is None else override


def low_bit_adamw(bits: int, in_backward: bool = False, preset: bool = False):
    """torchao's AdamW with ``bits``-bit moments (the first step compiles its kernel), optionally in backward (with
    ``preset``: in the preset's slices, each tensor's gradient clipped as the preset clips it)."""

    def make(params):
        from peft_hft import OptimizerInBackward
        from peft_hft import low_bit_adamw as optimizer_class

        cls = optimizer_class(bits)
        if not in_backward:
            return cls(params, lr=1e-5)
        if not preset:
            return OptimizerInBackward(params, cls, lr=1e-5)
        from peft_hft import low_memory_preset

        clip = low_memory_preset(bits)["clip_per_tensor"]
        return OptimizerInBackward(params, cls, preset_chunk_elements(), clip_per_tensor=clip, lr=1e-5)

    return make


def _hft_low_memory(model, offload: bool = False):
    from peft_hft import low_memory_preset

    return _hft(model, **low_memory_preset(offload=offload)["hft_config"])


# Variants that fix gradient checkpointing on (the low-memory preset's training arguments).
CHECKPOINTED_VARIANTS = {"hft-low-memory", "hft-low-memory-offload"}
# Variants whose optimizer step is compiled (torchao): on the CPU their steps are sampled by a thread (_SampledSteps).
COMPILED_VARIANTS = {"hft-adamw8bit", "hft-adamw4bit", "hft-low-memory"}

# name (as `estimate-memory` calls the method) -> (model -> trainable model, params -> optimizer).
TRAINING_VARIANTS = {
    "fft": (_fft, fused_adamw),
    "lora": (_lora, fused_adamw),
    "freeze": (_freeze, fused_adamw),
    "hft": (_hft, fused_adamw),
    "hft-fp32": (lambda m: _hft(m, master_weights="fp32"), fused_adamw),
    "hft-fp32-offload": (lambda m: _hft(m, master_weights="fp32_offload"), fused_adamw),
    "hft-kahan": (lambda m: _hft(m, master_weights="kahan"), fused_adamw),
    "hft-kahan8": (lambda m: _hft(m, master_weights="kahan8"), fused_adamw),
    "hft-stochastic-rounding": (lambda m: _hft(m, master_weights="stochastic_rounding"), fused_adamw),
    "hft-no-masters": (lambda m: _hft(m, fp32_master_weights=False), fused_adamw),
    "hft-step-in-backward": (_hft, adamw_in_backward),
    "hft-adamw8bit": (_hft, low_bit_adamw(8)),
    "hft-adamw4bit": (_hft, low_bit_adamw(4)),
    "hft-nf4-frozen": (_hft_nf4_frozen, fused_adamw),
    "hft-low-memory": (_hft_low_memory, low_bit_adamw(4, in_backward=True, preset=True)),
    "hft-low-memory-offload": (lambda m: _hft_low_memory(m, offload=True), fused_adamw),
}


def training_step(model, optimizer, batch) -> None:
    """One step as Trainer takes it: forward with labels, backward, optimizer step, gradients set to None."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def originals_store_bytes(model) -> int:
    """Bytes HFT keeps in host memory for the originals of its trained tensors (0 for other methods)."""
    from peft_hft.tuner.layer import find_ledger

    ledger = find_ledger(model)
    return 0 if ledger is None else sum(ledger.originals_bytes().values())


def measure_training_peak(load_model, variant: str, batches, gradient_checkpointing: bool = False,
                          device: str = "cpu") -> dict:
    """Peak bytes of one training step of ``variant``, counted from before the model was loaded.

    ``load_model()`` returns the base model on ``device``. The first step creates the optimizer state and HFT's
    masters; the second is measured. On the CPU, HFT's originals (host memory, on the CPU the same memory) are
    subtracted, as ``estimate-memory`` reports them apart.
    """
    import gc

    make_model, make_optimizer = TRAINING_VARIANTS[variant]

    def allocated() -> int:
        gc.collect()
        return torch.cuda.memory_allocated() if device.startswith("cuda") else cpu_allocated_bytes()

    compiled = variant in COMPILED_VARIANTS
    if compiled:
        # compile the optimizer's kernels for these shapes on a throwaway model first: the compiled code and
        # torch.compile's caches stay for the process (host memory, not training state)
        _throwaway_step(load_model, make_model, make_optimizer, batches[0], gradient_checkpointing, compiled=True)
    model = load_model()
    # counted from "nothing but the weights": whatever loading left behind (Python objects, init scratch) is not part
    # of training memory
    base = allocated() - sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = make_model(model)
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    counted_training_steps(model, optimizer, batches[:1], compiled, device)
    gc.collect()
    peak = counted_training_steps(model, optimizer, batches[1:], compiled, device)
    store = originals_store_bytes(model) if not device.startswith("cuda") else 0
    result = {"variant": variant, "peak_bytes": peak - base - store, "originals_store_bytes": store}
    del model, optimizer
    gc.collect()
    return result


def counted_training_steps(model, optimizer, batches, compiled: bool, device: str = "cpu") -> int:
    """Training steps on ``batches`` under the peak counter; the peak (absolute, see :class:`PeakMemory`).
    ``compiled``: the optimizer's step is compiled (:data:`COMPILED_VARIANTS`), so it is sampled by
    :class:`_SampledSteps`.

    Every step of a measurement runs this way, the unmeasured ones included: the first operation of each kind run
    under a ``TorchDispatchMode`` caches its Python dispatch entries for the process (about 1 MB over a training
    step), which would otherwise be counted in the measured step.
    """
    sampled = compiled and not device.startswith("cuda")
    with PeakMemory(device) as peak, (_SampledSteps(optimizer) if sampled else contextlib.nullcontext()) as steps:
        for batch in batches:
            training_step(model, optimizer, batch)
    return max(peak.peak, steps.peak) if sampled else peak.peak


def warm_up(load_model, batch, gradient_checkpointing: bool) -> None:
    """Throwaway training steps (plain freezing; the step after backward, then fused into it) before anything is
    measured.

    The first backward pass and optimizer step of a process allocate library state that stays for the process
    (oneDNN's primitive cache and MKL's buffers, about 15 MB on the CPU), and so does the first step taken inside
    backward (another 15 MB): not training state, and without these steps it would be counted in whichever variant
    happens to be measured first.
    """
    for make_optimizer in (fused_adamw, adamw_in_backward):
        _throwaway_step(load_model, _freeze, make_optimizer, batch, gradient_checkpointing)


def _throwaway_step(load_model, make_model, make_optimizer, batch, gradient_checkpointing: bool,
                    compiled: bool = False) -> None:
    import gc

    model = load_model()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = make_model(model).train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    counted_training_steps(model, optimizer, [batch], compiled, next(model.parameters()).device.type)
    del model, optimizer
    gc.collect()


def compare_with_estimate(model_dir: str, dtype: str, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                          variants=None, seed: int = 0, device: str = "cpu") -> list[dict]:
    """Measured peak and ``estimate_memory`` for each variant, on the model of ``model_dir`` (weights loaded if the
    directory has them, else random weights from its config)."""
    from dataclasses import replace
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_hft import estimate_memory
    from peft_hft.ops.estimate_memory import default_recipes

    names = list(variants or TRAINING_VARIANTS)
    has_weights = any(Path(model_dir).glob("*.safetensors"))
    config = AutoConfig.from_pretrained(model_dir)

    def load():
        torch.manual_seed(seed)
        if has_weights:
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).to(device)

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=generator)
        batches.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    recipes = default_recipes()
    for preset in ("hft-low-memory", "hft-low-memory-offload"):
        recipes[preset] = replace(recipes[preset], chunk_elements=preset_chunk_elements())
    estimate = estimate_memory(model_dir, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                               gradient_checkpointing=gradient_checkpointing, methods=names, recipes=recipes)
    warm_up(load, batches[0], gradient_checkpointing)
    rows = []
    for name in names:
        if name in CHECKPOINTED_VARIANTS and not gradient_checkpointing:
            continue  # the preset turns gradient checkpointing on (its estimate does too): measured with it on only
        measured = measure_training_peak(load, name, batches, gradient_checkpointing, device)
        method = estimate.methods[name]
        # on the CPU the host memory of "fp32_offload" (masters, optimizer state) is the memory measured
        estimated = method.total_bytes + (0 if device.startswith("cuda") else method.offloaded_bytes)
        rows.append({
            "variant": name, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing,
            "measured_bytes": measured["peak_bytes"], "estimated_bytes": estimated,
            "ratio": estimated / measured["peak_bytes"], "components": method.components,
            "offloaded_bytes": method.offloaded_bytes,
            "peak_phase": method.peak_phase, "device": device,
        })
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


class _SampledSteps:
    """Samples malloc's count from a thread during the optimizer steps only, which run outside ``PeakMemory``.

    ``torch.compile`` (torchao's step) refuses to run under a ``TorchDispatchMode``, so each compiled step (the
    optimizer's, or each inner optimizer's of ``OptimizerInBackward``, which steps in backward) runs with the mode
    popped, while a thread samples every 0.2 ms; the rest of the step (forward, backward) stays under the mode,
    sampled after every operation. A thread sampling everything would also catch, at random, the scratch *inside*
    one operation (oneDNN's reordered matmul operands, up to a few MB around the lm_head): not training state, not
    what the other variants count, and not the same from run to run. A sample counts only when the step it falls in
    was running both before and after it was taken.
    """

    def __init__(self, optimizer) -> None:
        self.peak = 0
        self._window = 0  # odd while a step runs
        inners = getattr(optimizer, "optimizers", None)
        self._optimizers = [o for per_tensor in inners for o in per_tensor] if inners is not None else [optimizer]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            before = self._window
            now = cpu_allocated_bytes()
            if before % 2 and self._window == before:
                self.peak = max(self.peak, now)
            time.sleep(0.0002)

    def _outside_the_mode(self, step):
        from torch.utils._python_dispatch import _disable_current_modes

        def wrapped(*args, **kwargs):
            with _disable_current_modes():
                self._window += 1
                try:
                    return step(*args, **kwargs)
                finally:
                    self.peak = max(self.peak, cpu_allocated_bytes())
                    self._window += 1

        return wrapped

    def __enter__(self) -> _SampledSteps:
        for optimizer in self._optimizers:
            optimizer.step = self._outside_the_mode(optimizer.step)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        for optimizer in self._optimizers:
            del optimizer.step  # the class's step again


def _sampled_peak(work, start: int) -> int:
    """Run ``work()`` while a thread samples malloc's count every 0.2 ms; the largest count seen (>= ``start``)."""
    sampled, done = [start], threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled[0] = max(sampled[0], cpu_allocated_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return sampled[0]


def optimizer_scratch(bits: int, dtype: str, numel: int = 2**24, device: str = "cpu", steps: int = 3) -> dict:
    """Scratch bytes per element of one torchao low-bit AdamW step on a single ``numel``-element tensor.

    torchao compiles its per-tensor step (``torch.compile``), which a ``TorchDispatchMode`` cannot observe, so on the
    CPU a thread samples malloc's count every 0.2 ms while the step runs (CUDA has its own peak counter). The state
    exists before the measured steps (the first step creates it and compiles); the gradient is allocated before the
    count starts. ``dtype`` is what the optimizer is handed: ``float32`` under HFT's masters (the pre-step hook gives
    it the fp32 value and gradient), ``bfloat16`` without.
    """
    from peft_hft import low_bit_adamw as optimizer_class

    param = torch.nn.Parameter(torch.randn(numel // 4096, 4096, dtype=getattr(torch, dtype), device=device))
    optimizer = optimizer_class(bits)([param], lr=1e-5)
    per_element = []
    for _ in range(steps + 1):
        param.grad = torch.randn_like(param)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            optimizer.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            start = cpu_allocated_bytes()
            peak = _sampled_peak(optimizer.step, start)
        param.grad = None
        per_element.append((peak - start) / numel)
    return {"bits": bits, "dtype": dtype, "numel": numel, "device": device,
            "scratch_bytes_per_element": per_element[1:]}  # the first step compiles and creates the state


def main(argv=None) -> None:
    import argparse
    import json
    import os
    import sys

    parser = argparse.ArgumentParser(description="Measured peak training memory beside estimate-memory's estimate.")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="repeatable")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument("--variants", default=None, help=f"comma-separated (default: {','.join(TRAINING_VARIANTS)})")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (torch.cuda.max_memory_allocated)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (last line)")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="the slice size of hft-low-memory's step (default: the preset's, 2**24)")
    parser.add_argument("--optimizer-scratch", action="store_true",
                        help="instead: torchao's AdamW8bit/4bit step scratch per element, fp32 and bf16 tensors")
    args = parser.parse_args(argv)
    if args.optimizer_scratch:
        rows = [optimizer_scratch(bits, dtype, device=args.device)
                for bits in (8, 4) for dtype in ("float32", "bfloat16")]
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    if args.device == "cpu" and os.environ.get("MKL_DISABLE_FAST_MM") != "1":
        os.environ["MKL_DISABLE_FAST_MM"] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    PRESET_CHUNK_ELEMENTS["override"] = args.chunk_elements
    model = args.model
    if model is None:
        from peft_hft.resources.default_model import default_model_path

        model = str(default_model_path())
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    variants = args.variants.split(",") if args.variants else None
    rows = []
    for dtype in args.dtype or ["float32"]:
        for ckpt in checkpointing:
            rows += compare_with_estimate(model, dtype, args.batch_size, args.seq_len, ckpt, variants,
                                          device=args.device)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{model}, batch {args.batch_size} x {args.seq_len}, {args.device}")
    print(f"{'variant':<18}{'dtype':<10}{'ckpt':<6}{'measured MiB':>14}{'estimated MiB':>15}{'est/meas':>10}")
    for r in rows:
        print(f"{r['variant']:<18}{r['dtype']:<10}{'on' if r['gradient_checkpointing'] else 'off':<6}"
              f"{r['measured_bytes'] / 2**20:>14.1f}{r['estimated_bytes'] / 2**20:>15.1f}{r['ratio']:>10.3f}")


if __name__ == "__main__":
    main()
