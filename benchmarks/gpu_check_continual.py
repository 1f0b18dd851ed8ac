"""GPU check of continual HFT (about a minute on an H100): stages trained on CUDA, folded and rebuilt exactly.

Checks, for float32 and bfloat16 models on the GPU:
* every stage changes only tensors of its mask (originals kept in host memory, the default);
* the stage history rebuilds the final model bit for bit, both onto a base on the GPU and onto a base on the CPU;
* complementary masks share no block tensor between consecutive stages;
* time per stage fold (save diff, unload, apply) for SmolLM2-sized tensors is reported.

    OUT=/tmp/out python benchmarks/gpu_check_continual.py
    DEVICE=cpu OUT=/tmp/out python benchmarks/gpu_check_continual.py   # a dry run of the logic, tiny models only

Writes ``$OUT/gpu_check_continual.json`` and exits non-zero if a check fails.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import peft_hft  # noqa: F401
from peft_hft import HFTConfig
from peft_hft.continual import ContinualHFT, StageHistory
from peft_hft.tuner.selection import analyze_model


def build(dtype: torch.dtype, device: str, seed: int = 0, size: str = "tiny") -> torch.nn.Module:
    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=4, vocab_size=512)
    if size == "smollm2":  # SmolLM2-135M's shapes, random weights
        dims = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **dims), dtype=dtype)
    return model.to(device)


def train(model, steps: int, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 32), generator=g).to(params[0].device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


DEVICE = os.environ.get("DEVICE", "cuda")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check(dtype: torch.dtype, policy: str, size: str, workdir: Path) -> dict:
    model = build(dtype, DEVICE, size=size)
    base = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    continual = ContinualHFT(model, HFTConfig(seed=0), workdir / f"{size}-{dtype}-{policy}", policy=policy)
    ok_masks, fold_seconds = True, []
    for k in range(3):
        before = {k2: v.detach().clone() for k2, v in model.state_dict().items()}
        peft_model = continual.start_stage(f"task{k}")
        train(peft_model, steps=3, seed=k)
        sync()
        start = time.perf_counter()
        continual.end_stage()
        sync()
        fold_seconds.append(time.perf_counter() - start)
        changed = {n for n, v in model.state_dict().items() if not torch.equal(before[n], v)}
        # nothing outside the mask moves (in bf16 a tiny update can leave a selected tensor unchanged)
        ok_masks &= bool(changed) and changed <= set(continual.history.stages[-1].selected_parameters)
    block = {u.name for u in analyze_model(model).block_units()}
    stages = continual.history.stages
    overlaps = [
        len(set(a.selected_parameters) & set(b.selected_parameters) & block)
        for a, b in zip(stages, stages[1:], strict=False)
    ]
    final = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    exact = {}
    for device in dict.fromkeys((DEVICE, "cpu")):
        fresh = build(dtype, device, size=size)
        fresh.load_state_dict({k: v.to(device) for k, v in base.items()})
        rebuilt = StageHistory(continual.history.path).load(fresh).state_dict()
        exact[device] = all(torch.equal(rebuilt[n].cpu(), final[n]) for n in final)
    return {
        "dtype": str(dtype), "policy": policy, "size": size, "only_mask_changed": ok_masks, "rebuild_exact": exact,
        "block_overlaps": overlaps, "fold_seconds": [round(s, 3) for s in fold_seconds],
        "passed": ok_masks and all(exact.values()) and (policy != "complementary" or not any(overlaps)),
    }


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("No CUDA device; this check needs a GPU (DEVICE=cpu runs a dry run of the logic).")
        return 2
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            for policy in ("random", "complementary"):
                results.append(check(dtype, policy, "tiny", Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
        if DEVICE == "cuda":
            results.append(check(torch.bfloat16, "random", "smollm2", Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "results": results,
              "passed": all(r["passed"] for r in results)}
    (out / "gpu_check_continual.json").write_text(json.dumps(report, indent=1))
    print("PASSED" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
