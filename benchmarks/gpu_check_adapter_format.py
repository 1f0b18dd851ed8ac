"""GPU check of the adapter format: fingerprints of accelerator-resident originals, cross-dtype base checks, and the
streamed merge of a GPU-trained bf16 adapter.

On SmolLM2-135M-Instruct loaded in bf16 on the GPU, for ``originals_device`` "cpu" and "device": a few HFT steps,
save (float32 diffs, so the reconstruction is exact), then

1. load onto the bf16 base on the GPU: every weight equals the tuned weight bit for bit;
2. load onto the fp32 base on the CPU (the checkpoint as stored): the base check passes (bf16 record, finer base);
3. ``peft-hft merge`` of the fp32 checkpoint with ``--dtype bfloat16``: equals the tuned bf16 weights bit for bit;
4. a base with one perturbed tensor is refused (BaseMismatchError naming it).

    OUT=/tmp/gpu-check python benchmarks/gpu_check_adapter_format.py     # about a minute on an H100

Writes $OUT/gpu_check_adapter_format.json and exits non-zero if a check fails. Falls back to the CPU when no GPU is
present (slow; only to try the script).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_hft
from peft_hft.ops.merge import merge_checkpoint
from peft_hft.resources.data import alpaca_demo
from peft_hft.resources.default_model import default_model_path, load_default_model

OUT = Path(os.environ["OUT"])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "10"))


def batch(tokenizer, rows):
    texts = [f"### Instruction:\n{r['instruction']}\n### Response:\n{r['output']}" for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256).to(DEVICE)
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def run(originals_device: str, rows, results: dict) -> None:
    model, tokenizer = load_default_model(dtype=torch.bfloat16, device=DEVICE)
    peft_model = get_peft_model(
        model, peft_hft.HFTConfig(seed=0, originals_device=originals_device, diff_dtype="float32")
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(STEPS):
        loss = peft_model(**batch(tokenizer, rows[8 * step: 8 * step + 8])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    tuned = {k: v.detach().clone() for k, v in peft_model.get_base_model().state_dict().items()}
    adapter = OUT / f"adapter-{originals_device}"
    start = time.perf_counter()
    peft_model.save_pretrained(adapter)
    save_seconds = time.perf_counter() - start
    record = json.loads((adapter / "adapter_config.json").read_text())["base_fingerprint"]
    checks = {"save_seconds (incl. fingerprint)": save_seconds,
              "fingerprint_dtypes": sorted({t["dtype"] for t in record["tensors"].values()})}
    del peft_model, model, optimizer

    base_bf16, _ = load_default_model(dtype=torch.bfloat16, device=DEVICE)
    loaded = PeftModel.from_pretrained(base_bf16, adapter).get_base_model().state_dict()
    checks["1 bf16 GPU base: weights bit-identical"] = all(torch.equal(loaded[k], tuned[k]) for k in tuned)
    del base_bf16, loaded

    base_fp32, _ = load_default_model(dtype=torch.float32)
    try:
        PeftModel.from_pretrained(base_fp32, adapter)
        checks["2 fp32 CPU base: check passes"] = True
    except peft_hft.BaseMismatchError as exc:
        checks["2 fp32 CPU base: check passes"] = f"FAILED: {exc}"
    del base_fp32

    merged_dir = OUT / f"merged-{originals_device}"
    start = time.perf_counter()
    merge_checkpoint(default_model_path(), adapter, merged_dir, dtype="bfloat16", progress=False, overwrite=True)
    checks["merge_seconds"] = time.perf_counter() - start
    merged = load_file(merged_dir / "model.safetensors")
    checks["3 peft-hft merge --dtype bfloat16: bit-identical"] = all(
        torch.equal(merged[k], tuned[k].cpu()) for k in merged
    )

    wrong, _ = load_default_model(dtype=torch.bfloat16, device=DEVICE)
    victim = sorted(record["tensors"])[3]
    with torch.no_grad():
        wrong.get_parameter(victim)[0, 0] += 1
    try:
        PeftModel.from_pretrained(wrong, adapter)
        checks["4 perturbed base refused"] = "FAILED: loaded"
    except peft_hft.BaseMismatchError as exc:
        checks["4 perturbed base refused"] = victim in str(exc) and "1 of the" in str(exc)
    results[f"originals_device={originals_device}"] = checks


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = alpaca_demo()
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "steps": STEPS,
               "torch": torch.__version__}
    for originals_device in ("cpu", "device"):
        run(originals_device, rows, results)
    (OUT / "gpu_check_adapter_format.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    failed = [
        f"{group}: {name}" for group, checks in results.items() if isinstance(checks, dict)
        for name, value in checks.items() if name[0].isdigit() and value is not True
    ]
    if failed:
        print("FAILED:", *failed, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
