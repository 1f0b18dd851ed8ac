"""``estimate_memory``: exact trained shares, the at-scale claims, and the estimate against measured CPU peaks.

The measured peaks come from ``benchmarks/memory.py`` (malloc's allocated bytes sampled after every PyTorch
operation, from the weights on; MKL's matmul buffer cache switched off), run once in a subprocess for every
(variant, dtype, gradient checkpointing) row of :data:`MEASURED`. Options built elsewhere add their rows to
``benchmarks/memory.py:TRAINING_VARIANTS`` and to :data:`MEASURED` here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config, tiny_model

from peft_hft import HFTConfig, estimate_memory
from peft_hft.ops.estimate_memory import (
    GiB,
    TrainingRecipe,
    default_recipes,
    format_estimate,
    low_memory_recipe,
)
from peft_hft.tuner.selection import resolve_selection

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "benchmarks" / "model_configs"
TOLERANCE = 0.10

# (variant, dtype, gradient checkpointing) -> allowed relative error of the estimated total against the measurement
# Every option of estimate-memory's table is measured: the masters (fp32, fp32 in host memory, Kahan, Kahan in 1 byte,
# stochastic rounding, none), the step
# fused into backward, torchao's low-bit AdamW (compiled; its steps sampled from a thread), the NF4 frozen half and
# the preset (which fixes gradient checkpointing on). benchmarks/memory.py takes a throwaway step first, so the CPU
# libraries' one-time state (oneDNN/MKL buffers, compiled kernels, dispatch caches) is not counted in whichever
# variant comes first.
MEASURED: dict[tuple[str, str, bool], float] = {
    **{(v, "float32", False): TOLERANCE for v in ("fft", "lora", "freeze", "hft")},
    **{(v, "bfloat16", False): TOLERANCE for v in (
        "fft", "lora", "hft", "hft-fp32", "hft-fp32-offload", "hft-kahan8", "hft-stochastic-rounding", "hft-no-masters",
        "hft-step-in-backward",
        "hft-adamw8bit", "hft-adamw4bit", "hft-nf4-frozen")},
    **{(v, "bfloat16", True): TOLERANCE for v in ("fft", "hft", "freeze", "hft-step-in-backward", "hft-low-memory",
                                                   "hft-low-memory-offload")},
}
_NEEDS_TORCHAO = {"hft-nf4-frozen", "hft-adamw8bit", "hft-adamw4bit", "hft-low-memory"}


def _runnable(variant: str) -> bool:
    """Whether this environment can train ``variant`` (NF4 and the low-bit optimizers need torchao)."""
    import importlib.util

    return variant not in _NEEDS_TORCHAO or importlib.util.find_spec("torchao") is not None


def _small_llama(tmp_path: Path, **overrides) -> Path:
    """A config large enough that the training state dominates malloc's bookkeeping (about 4.5M parameters)."""
    spec = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                vocab_size=4096)
    spec.update(overrides)
    tiny_config("llama", layers=4, **spec).save_pretrained(tmp_path)
    return tmp_path


def _measure(model_dir: Path, dtype: str, ckpt: str, variants: list[str], *extra: str) -> list[dict]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--model", str(model_dir), "--dtype", dtype,
           "--gradient-checkpointing", ckpt, "--batch-size", "2", "--seq-len", "64", "--variants", ",".join(variants),
           "--json", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    return _small_llama(tmp_path_factory.mktemp("small_llama"))


@pytest.fixture(scope="module")
def measured(small_llama) -> dict[tuple[str, str, bool], dict]:
    rows = {}
    for dtype in ("float32", "bfloat16"):
        for ckpt in ("off", "on"):
            variants = sorted({v for v, d, c in MEASURED if d == dtype and c == (ckpt == "on") and _runnable(v)})
            if variants:
                for row in _measure(small_llama, dtype, ckpt, variants):
                    rows[(row["variant"], row["dtype"], row["gradient_checkpointing"])] = row
    return rows


@pytest.mark.parametrize("case", sorted(MEASURED), ids=lambda c: f"{c[0]}-{c[1]}-{'ckpt' if c[2] else 'nockpt'}")
def test_estimate_agrees_with_the_measured_cpu_peak(measured, case):
    if not _runnable(case[0]):
        pytest.skip(f"{case[0]} needs torchao, which is not installed (the dev extra has it)")
    row = measured[case]
    error = row["estimated_bytes"] / row["measured_bytes"] - 1
    print(f"MEASURED {case}: measured {row['measured_bytes'] / 2**20:.2f} MiB, estimated "
          f"{row['estimated_bytes'] / 2**20:.2f} MiB, {100 * error:+.1f}%")
    assert abs(error) <= MEASURED[case], (
        f"{case}: estimated {row['estimated_bytes'] / 2**20:.2f} MiB, measured {row['measured_bytes'] / 2**20:.2f} MiB "
        f"({100 * error:+.1f}%), components {row['components']}"
    )


def test_the_step_in_slices_lowers_the_measured_peak_and_the_estimate_follows(measured, small_llama):
    """The preset's step in slices (chunk_elements): with slices of 65536 elements the 1M-element embedding and
    lm_head are stepped 16 slices at a time, so their fp32 copies and torchao's scratch shrink 16-fold; the
    measured peak falls by more than half and the estimate follows it."""
    if not _runnable("hft-low-memory"):
        pytest.skip("the preset needs torchao, which is not installed (the dev extra has it)")
    (row,) = _measure(small_llama, "bfloat16", "on", ["hft-low-memory"], "--chunk-elements", "65536")
    whole = measured[("hft-low-memory", "bfloat16", True)]  # the preset's 2**24: nothing this small is sliced
    assert row["measured_bytes"] < 0.5 * whole["measured_bytes"]
    assert row["estimated_bytes"] < 0.5 * whole["estimated_bytes"]
    assert abs(row["estimated_bytes"] / row["measured_bytes"] - 1) <= TOLERANCE, row


def _memory_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_memory", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RecordingSGD(torch.optim.SGD):
    """SGD that notes, in each step, the dispatch modes active and allocates 8 MB of scratch (a compiled step's)."""

    modes_in_step: list[int] = []

    def step(self, closure=None):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        type(self).modes_in_step.append(len(_get_current_dispatch_mode_stack()))
        scratch = torch.ones(2**21)  # 8 MB, freed before the step returns
        time.sleep(0.02)  # a step that takes a while (the sampling thread looks every 0.2 ms)
        del scratch
        return super().step(closure)


@pytest.mark.parametrize("in_backward", [False, True], ids=["step-after-backward", "step-in-backward"])
def test_compiled_steps_run_outside_the_dispatch_mode_and_their_scratch_is_counted(in_backward):
    """benchmarks/memory.py's counter: torch.compile refuses to run under a TorchDispatchMode, so every optimizer step
    of a compiled variant (each inner step of OptimizerInBackward too) runs with the mode popped, sampled by a thread;
    the scratch of the step is in the peak, and the optimizers' own ``step`` is back afterwards."""
    from peft_hft import OptimizerInBackward

    memory = _memory_benchmark()
    model = tiny_model("llama", layers=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (OptimizerInBackward(params, _RecordingSGD, lr=1e-3) if in_backward
                 else _RecordingSGD(params, lr=1e-3))
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    batch = {"input_ids": ids, "labels": ids}
    _RecordingSGD.modes_in_step = []
    rest = memory.cpu_allocated_bytes()
    peak = memory.counted_training_steps(model, optimizer, [batch], compiled=True)
    assert _RecordingSGD.modes_in_step and set(_RecordingSGD.modes_in_step) == {0}
    assert peak - rest >= 2**23  # the step's 8 MB, seen by the sampling thread or at the step's end
    inners = [o for per in optimizer.optimizers for o in per] if in_backward else [optimizer]
    assert all("step" not in vars(o) for o in inners)
    _RecordingSGD.modes_in_step = []
    memory.counted_training_steps(model, optimizer, [batch], compiled=False)
    assert set(_RecordingSGD.modes_in_step) == {1}  # not compiled: the step is counted after each of its operations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_share_is_the_real_selection_with_tied_embeddings_counted_once(tmp_path, dtype):
    tiny_config("llama", layers=3, tie_word_embeddings=True).save_pretrained(tmp_path)
    model = tiny_model("llama", layers=3, tie_word_embeddings=True, dtype=dtype)
    selection = resolve_selection(model, HFTConfig())
    expected = sum(model.get_parameter(n).numel() for n in selection)
    result = estimate_memory(tmp_path / "config.json", batch_size=1, seq_len=8, dtype=str(dtype).split(".")[1],
                             methods=["hft", "freeze", "fft"])
    total = sum(p.numel() for p in model.parameters())
    assert result.methods["hft"].trainable_parameters == result.methods["freeze"].trainable_parameters == expected
    assert result.methods["fft"].trainable_parameters == result.methods["fft"].total_parameters == total
    hft = result.methods["hft"]
    low_precision = dtype == torch.bfloat16
    assert hft.components["optimizer_state"] == 2 * expected * 4  # AdamW steps the fp32 master (or fp32 weight)
    assert hft.components["masters"] == (2 * expected if low_precision else 0)  # the default Kahan compensation
    assert hft.host_bytes == expected * (2 if low_precision else 4)
    assert hft.total_bytes == sum(hft.components.values())


def test_options_change_the_components_they_define(tmp_path):
    config = _small_llama(tmp_path, vocab_size=256)
    result = estimate_memory(config, batch_size=1, seq_len=16)
    m = result.methods
    trained = m["hft"].trainable_parameters
    assert m["hft-kahan"].components["masters"] == 2 * trained
    assert m["hft-kahan"].components == m["hft"].components  # the default, also under its own name
    assert m["hft-fp32"].components["masters"] == 4 * trained
    assert m["hft-stochastic-rounding"].components["masters"] == m["freeze"].components["masters"] == 0
    # AdamW8bit: 1 byte + an fp32 scale per 256 elements per moment for large tensors, far below AdamW's 8 bytes
    assert m["hft-adamw8bit"].components["optimizer_state"] < 0.3 * m["hft"].components["optimizer_state"]
    assert m["hft-adamw4bit"].components["optimizer_state"] < m["hft-adamw8bit"].components["optimizer_state"]
    assert m["hft-step-in-backward"].components["gradients"] < m["hft"].components["gradients"]
    assert m["hft-nf4-frozen"].components["weights"] < m["hft"].components["weights"]
    assert m["hft-low-memory"].gradient_checkpointing and not m["hft"].gradient_checkpointing
    assert m["hft-low-memory"].total_bytes < m["freeze"].total_bytes < m["hft"].total_bytes < m["fft"].total_bytes


def test_gradient_checkpointing_lowers_the_activations(tmp_path):
    config = _small_llama(tmp_path)
    off = estimate_memory(config, batch_size=2, seq_len=64, methods=["freeze"]).methods["freeze"]
    on = estimate_memory(config, batch_size=2, seq_len=64, gradient_checkpointing=True,
                         methods=["freeze"]).methods["freeze"]
    assert on.activation_peak_bytes < off.activation_peak_bytes
    assert on.components["weights"] == off.components["weights"]


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        estimate_memory(tmp_path)
    config = _small_llama(tmp_path)
    with pytest.raises(ValueError, match="hft-low-memory"):
        estimate_memory(config, methods=["qlora"])
    with pytest.raises(ValueError, match="positive"):
        estimate_memory(config, batch_size=0)


@pytest.fixture(scope="module")
def llama3_8b():
    return estimate_memory(CONFIGS / "Meta-Llama-3-8B", batch_size=1, seq_len=2048, gradient_checkpointing=True,
                           methods=["fft", "hft", "lora", "hft-low-memory", "hft-low-memory-offload"])


def test_llama3_8b_shapes_are_the_published_ones(llama3_8b):
    assert llama3_8b.methods["fft"].total_parameters == 8_030_261_248
    share = llama3_8b.methods["hft"].trainable_parameters / llama3_8b.methods["hft"].total_parameters
    assert 0.55 < share < 0.58  # half the blocks plus the untied embeddings and lm_head
    assert llama3_8b.methods["lora"].total_bytes < 20 * GiB
    assert "hft-low-memory" in format_estimate(llama3_8b)


def test_llama3_8b_default_hft_is_at_most_0_6_of_fft(llama3_8b):
    assert llama3_8b.methods["hft"].total_bytes <= 0.6 * llama3_8b.methods["fft"].total_bytes


def test_llama3_8b_one_tensor_at_a_time_puts_kahan_below_fp32_masters():
    """The step's fp32 copies exist for one tensor (the 525M-element embedding), so Kahan's 2-byte buffer is below
    fp32 masters' 4 bytes at the peak too (stepped all at once it was 93.6 GiB against 82.2), and HFT with it is
    under 0.6x FFT."""
    recipes = {"fft": default_recipes()["fft"], "fp32": TrainingRecipe("hft", "fp32"),
               "kahan": TrainingRecipe("hft", "kahan")}
    e = estimate_memory(CONFIGS / "Meta-Llama-3-8B", batch_size=1, seq_len=2048, gradient_checkpointing=True,
                        recipes=recipes)
    kahan, fp32 = e.methods["kahan"], e.methods["fp32"]
    assert kahan.total_bytes < fp32.total_bytes < 0.63 * e.methods["fft"].total_bytes
    assert kahan.total_bytes <= 0.6 * e.methods["fft"].total_bytes
    embedding = 128256 * 4096
    assert fp32.components["step_temporaries"] == embedding * 2  # fp32 gradient copy (4) less the bf16 weight (2)
    # + the exact value; the write-back goes piece by piece into the old compensation buffer, so its scratch (one
    # piece) is below what it frees (the fp32 gradient copy, less the new bf16 weight)
    assert kahan.components["step_temporaries"] == embedding * (8 - 2)


def test_llama3_8b_low_memory_preset_fits_24_gib(llama3_8b):
    """bf16 weights (15.0 GiB), AdamW4bit states of 4.5B trained parameters (4.5 GiB), checkpointed activations with
    the fp32 logits (3.5 GiB); the 525M-element embedding and lm_head are stepped in slices of 2**24 elements, so
    no step holds more than one slice's copies and scratch. Stepped whole they alone took 15.7 GiB (36.6 in all)."""
    preset = llama3_8b.methods["hft-low-memory"]
    assert preset.total_bytes <= 24 * GiB
    assert preset.peak_phase == "forward/backward"
    whole = estimate_memory(CONFIGS / "Meta-Llama-3-8B", batch_size=1, seq_len=2048, gradient_checkpointing=True,
                            methods=["hft-low-memory"], recipes={"hft-low-memory": replace(
                                low_memory_recipe(), chunk_elements=None)}).methods["hft-low-memory"]
    assert whole.total_bytes - preset.total_bytes > 10 * GiB


def test_llama3_8b_offloaded_preset_fits_24_gib_with_its_masters_and_adamw_in_host_memory(llama3_8b):
    """``low_memory_preset(offload=True)``: the accelerator holds the bf16 weights (15.0 GiB), the trained half's
    bf16 gradients and checkpointed activations, nothing of the masters or AdamW; host memory holds the fp32 masters
    (4 bytes per trained parameter), AdamW's fp32 moments (8), the bf16 originals (2) and, while a tensor is
    stepped, its fp32 gradient copy (the embedding's: 525M elements)."""
    offload, trained = llama3_8b.methods["hft-low-memory-offload"], llama3_8b.methods["hft"].trainable_parameters
    assert offload.total_bytes <= 24 * GiB
    assert offload.components["masters"] == offload.components["optimizer_state"] == 0
    assert offload.components["step_temporaries"] == 0
    assert offload.offloaded_bytes == 12 * trained + 4 * 128256 * 4096
    assert offload.host_bytes == offload.offloaded_bytes + 2 * trained
