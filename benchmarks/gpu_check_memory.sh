#!/usr/bin/env bash
# estimate-memory against torch.cuda.max_memory_allocated on one GPU: SmolLM2-135M-Instruct in bf16, every variant of
# benchmarks/memory.py:TRAINING_VARIANTS, with and without gradient checkpointing, torchao's step scratch per element
# (the estimate uses the CPU's: AdamW8bit 8, AdamW4bit 26 bytes), and the at-scale table.
# Usage: bash benchmarks/gpu_check_memory.sh   (needs a CUDA torch; about 2 minutes on an H100/H200)
# Expect est/meas within 0.90-1.10; CUDA's caching allocator is not counted (max_memory_allocated is the tensors).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python benchmarks/memory.py --device cuda --dtype bfloat16 --gradient-checkpointing both --batch-size 4 --seq-len 512
python benchmarks/memory.py --device cuda --dtype float32 --batch-size 4 --seq-len 512 --variants fft,lora,freeze,hft
python benchmarks/memory.py --device cuda --optimizer-scratch
python benchmarks/memory_at_scale.py
