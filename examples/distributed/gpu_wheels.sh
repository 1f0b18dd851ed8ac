#!/usr/bin/env bash
# Fetch what examples/distributed/gpu_check.sh needs beyond a CUDA image with torch, transformers and accelerate
# (for GPU machines without network access): DeepSpeed and its missing dependencies, and the PEFT version peft-hft is
# tested with. Writes wheels for CPython 3.12 / x86-64 into .whl/ (git-ignored); gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
PY="${PYTHON:-python3}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl peft==0.21.2 hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
# DeepSpeed ships an sdist only; its wheel is pure Python (no ops are compiled ahead of time)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
