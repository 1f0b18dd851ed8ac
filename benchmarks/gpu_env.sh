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

# run NAME ARGS...: one check step with its own log and time limit; "=== NAME: exit RC" goes to $OUT/summary.txt, the
# log's tail (progress bars left out) to the terminal; a failing step sets status=1 and the script goes on.
status=0
run() {
  local name=$1; shift
  local start; start=$(date +%s)
  timeout "${RUN_TIMEOUT_S:-300}" "$PY" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc, $(( $(date +%s) - start )) s wall (log: $OUT/$name.log)" | tee -a "$OUT/summary.txt"
  grep -v -e 'it/s]' -e 's/it]' "$OUT/$name.log" | tail -"${RUN_TAIL_LINES:-16}"
  [ "$rc" -eq 0 ] || status=1
}
