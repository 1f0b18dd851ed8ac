# Shared set-up of the GPU check scripts; source it from the repository root after setting OUT and PY.
# A GPU machine without network gets its missing packages as wheels carried in .whl/ (see docs/distributed.md);
# they are installed into /tmp/site. Then: the repository on PYTHONPATH, offline Hub, unbuffered output.
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
