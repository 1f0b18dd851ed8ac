#!/usr/bin/env bash
# GPU check of master values on bf16 models (issues 11, 20): the CUDA tests (tests/tuner/test_cuda.py, bf16 included),
# the bf16 step-time / peak-memory benchmark of every HFTConfig(master_weights=...) option, the optimizer step fused
# into backward and the low-memory preset (torchao AdamW4bit) against freezing, full fine-tuning pure bf16 and with fp32
# master weights, LoRA (with and without gradient checkpointing, held-out loss after 100 steps), and the quality run
# (held-out loss and cosine with the fp32 update of every option at lr 1e-5) on SmolLM2-135M-Instruct. Results (JSON +
# PNG + logs) go to $OUT (default /tmp/hft_precision_gpu). About 10-15 minutes on one H100/H200 (model loading, the
# torchao compile, 6 x 300 quality steps). Needs torchao (pip install 'peft-hft[lowmem]') for the preset.
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
# the memory options (issue 20): every master_weights option (fp32_offload: the copies and the host step), the step
# fused into backward and the low-memory preset
# (torchao AdamW4bit, compiled on CUDA) against freezing and FFT, with the held-out loss after 100 steps
RUN_TIMEOUT_S=600 run bench_bf16 benchmarks/bench_training.py --device cuda --dtype bfloat16 --batch-size 8 \
  --seq-len 512 --quality-steps 100 --output "$OUT"
RUN_TIMEOUT_S=600 run bench_bf16_gc benchmarks/bench_training.py --device cuda --dtype bfloat16 --batch-size 8 \
  --seq-len 512 --gradient-checkpointing --variants freeze,hft,hft-fp32,hft-offload,hft-sr,hft-bwd,hft-preset,fft \
  --tag cuda-bfloat16-gc --output "$OUT"
RUN_TIMEOUT_S=900 run quality benchmarks/bench_precision.py --device cuda --steps 300 --batch-size 8 --seq-len 512 \
  --eval-every 50 --eval-sequences 16 --output "$OUT"
echo "precision GPU check: $([ $status -eq 0 ] && echo PASS || echo FAIL); results in $OUT"
exit $status
