#!/usr/bin/env bash
# GPU check of fp32 master values on bf16 models (issue 11): the CUDA tests (tests/tuner/test_cuda.py, bf16 included),
# the bf16 step-time / peak-memory benchmark (HFT-bf16 with masters vs without, freezing, full fine-tuning pure bf16
# and with fp32 master weights, LoRA) and the quality run (held-out loss of HFT-bf16 vs HFT-fp32 vs HFT-bf16 without
# masters at lr 1e-5) on SmolLM2-135M-Instruct. Results (JSON + PNG + logs) go to $OUT (default /tmp/hft_precision_gpu).
# About 4-6 minutes on one H100/H200, mostly model loading and the 3 x 300 quality steps.
# Needs what benchmarks/gpu_check_trl.sh lists (the embedded model and the Alpaca demo data); MODEL_DIR is not used.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/hft_precision_gpu}"
PY="${PYTHON:-python3}"
source benchmarks/gpu_env.sh

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/preflight.txt" || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("FAIL: no CUDA device visible")
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported(), "| torch", torch.__version__)
from peft_hft.resources.default_model import default_model_path
print("model:", default_model_path())
PYEOF

run cuda_tests -m pytest -q tests/tuner/test_cuda.py -p no:cacheprovider
run bench_bf16 benchmarks/bench_training.py --device cuda --dtype bfloat16 --batch-size 8 --seq-len 512 \
  --output "$OUT"
run quality benchmarks/bench_precision.py --device cuda --steps 300 --batch-size 8 --seq-len 512 --eval-every 50 \
  --eval-sequences 16 --output "$OUT"
echo "precision GPU check: $([ $status -eq 0 ] && echo PASS || echo FAIL); results in $OUT"
exit $status
