#!/usr/bin/env bash
# One device call for issue 20 item 2 (srv5: the batcher's prompts through a compiled forward):
# 32 connected streaming clients through the server, before (the default: the eager prompt
# forward) and after (-cp: compiled, RAGTUNE_PREFILL_COMPILE=on) interleaved in one process (the
# compiled graphs warmed before the first wave: "prefill graphs of the other setting" gives the
# compile + 16 captures), then the GPU tests of the batcher and the server, the new one first.
#
#   COMMIT=<sha> WHEELS=<gemlite wheel folder> PYX=<fastapi/uvicorn/httpx folder> SERVE_S=250 TESTS_S=110 \
#     bash bench/serve_prefill_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/, bert_tok/); writes
# gpu.txt, serve_load.log + serve_load.jsonl and tests.log to $OUT as each stage ends.
set -u
OUT=${OUT:-/tmp/srv5out}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
export PYTHONPATH="$PYTHONPATH:${PYX:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
echo "commit ${COMMIT:-unknown}" | tee -a "$OUT/gpu.txt"
echo "=== serve_load $(date +%T)"
S=${SERVE_S:-230}
timeout "$S" python3 bench/serve_load.py --random --model .gpu/smol_tok --bnb4 --clients 32 \
  --prompt 512 --new 128 --max-seq-len 1024 --sequential 8 --deadline-s $((S - 45)) \
  --weights fp8 --modes process,process-cp,process,process-cp,process,process-cp --waves 1 \
  --group 1 --json "$OUT/serve_load.jsonl" > "$OUT/serve_load.log" 2>&1
echo "exit $?" >> "$OUT/serve_load.log"
python3 bench/serve_summary.py "$OUT/serve_load.jsonl" || true
grep -E "Error|error|Traceback|warning|exit" "$OUT/serve_load.log" | grep -v "^{" | tail -15 | cut -c 1-400
echo "=== tests $(date +%T)"
T=tests/test_gpu.py
timeout "${TESTS_S:-120}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short \
  $T::test_batcher_compiled_prefill_rows_are_bitwise_their_lone_ones \
  $T::test_batcher_fp8_concurrent_equals_one_at_a_time \
  $T::test_batcher_prefill_first_and_pairs_keep_one_at_a_time_answers \
  "$T::test_batcher_compiled_equals_one_at_a_time[4]" \
  $T::test_batcher_engine_never_syncs_the_stream \
  $T::test_server_batching_auto_on_the_cuda_fast_path \
  "$T::test_batcher_compiled_equals_one_at_a_time[1]" \
  > "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
grep -E "PASSED|FAILED|ERROR|exit|passed|failed|^E " "$OUT/tests.log" | tail -25 | cut -c 1-400
echo "=== done $(date +%T)"
