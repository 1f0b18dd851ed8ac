#!/usr/bin/env bash
# GPU check of HFT under accelerate's FSDP2 and DeepSpeed ZeRO-2/3 (plain accelerate loop and Trainer).
# Run from the repository root on a machine with one or more GPUs; results go to $OUT (default /tmp/hft_gpu_check):
# OUT/results.json and one PASS/FAIL line per check. About a minute per engine on one H100.
#
# Needs torch, transformers, accelerate, peft and deepspeed. Without network access, carry wheels in .whl/ (see
# docs/distributed.md): they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/hft_gpu_check}"
PY="${PYTHON:-python3}"
source benchmarks/gpu_env.sh
"$PY" -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)" | tee "$OUT/versions.txt"
"$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/versions.txt"
"$PY" examples/distributed/gpu_check.py prepare "$OUT" || exit 1
for engine in ${ENGINES:-fsdp2 zero2 zero3}; do
  echo "=== $engine"
  timeout "${ENGINE_TIMEOUT_S:-180}" "$PY" -m accelerate.commands.launch --config_file "$OUT/$engine.yaml" \
    examples/distributed/gpu_check.py run "$engine" "$OUT" > "$OUT/$engine.log" 2>&1
  echo "exit $? (log: $OUT/$engine.log)"; tail -3 "$OUT/$engine.log"
done
"$PY" examples/distributed/gpu_check.py report "$OUT"
