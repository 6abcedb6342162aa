#!/usr/bin/env bash
# One device call for issue 20 item 1 (ragtune's int4 GEMV): the GPU tests in the background
# while the kernel candidates compile, then the kernel sweep against gemlite, then the 12B
# decode benchmark with the settings the sweep chose.
#
#   WHEELS=<folder with the gemlite wheel> bash bench/int4_gemv_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/, bert_tok/); writes to
# $OUT: failing.log (main's failing test with gemlite's one-row kernels: RAGTUNE_INT4_GEMV=off),
# tests.log (the int4 GPU tests with ragtune's GEMV), gemv.log + gemv.jsonl (sweep),
# nvidia_h200.json (packaged settings + the sweep's "gemv" list), decode.log + decode.jsonl,
# final.log (FINAL_K: tests run alone after the decode benchmark).
set -u
OUT=${OUT:-/tmp/int4out}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gemv.log"
T=tests/test_gpu.py
echo "=== tests $(date +%T)"
([ "${FAIL_S:-240}" -gt 0 ] && RAGTUNE_INT4_GEMV=off timeout "${FAIL_S:-240}" python3 -m pytest -m gpu \
  -v -rA -p no:cacheprovider $T -k test_fastdecode_int4_equals_hf_generate_on_the_int4_weights \
  > "$OUT/failing.log" 2>&1; echo "exit $?" >> "$OUT/failing.log") &
FAIL_PID=$!
(timeout "${TESTS_S:-240}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short $T \
  -k "${TEST_K:-int4_gemv or gemv_compiled or gemlite_keeps or fastdecode_int4 or tuned_int4 or gemlite_int4 or bnb_4bit_model_in_int4}" > "$OUT/tests.log" 2>&1;
  echo "exit $?" >> "$OUT/tests.log") &
TESTS_PID=$!
timeout "${COMPILE_S:-200}" python3 bench/int4_gemv.py --out "$OUT/nvidia_h200.json" --compile-only --kernels "${KERNELS:-0,1}" \
  --workers "${WORKERS:-12}" --json "$OUT/gemv.jsonl" 2>&1 | tee -a "$OUT/gemv.log" | grep -v '"gemv"'
echo "=== compiled $(date +%T); waiting for the tests"
wait $FAIL_PID $TESTS_PID
[ -f "$OUT/failing.log" ] && tail -5 "$OUT/failing.log"; grep -E "PASSED|FAILED|ERROR|exit" "$OUT/tests.log" | tail -20
echo "=== sweep $(date +%T)"
timeout "${SWEEP_S:-150}" python3 bench/int4_gemv.py --out "$OUT/nvidia_h200.json" --skip-compile --kernels "${KERNELS:-0,1}" \
  --json "$OUT/gemv.jsonl" 2>&1 | tee -a "$OUT/gemv.log" | grep -v '"gemv"'
[ -f "$OUT/nvidia_h200.json" ] && export RAGTUNE_INT4_CONFIGS="$OUT/nvidia_h200.json"
echo "=== decode $(date +%T) configs=${RAGTUNE_INT4_CONFIGS:-packaged}"
timeout "${DECODE_S:-170}" python3 bench/decode.py --random --model .gpu/smol_tok \
  --variants fast_bnb4 --batches "" --profile --repeats 3 --json "$OUT/decode.jsonl" 2>&1 |
  tee "$OUT/decode.log" | grep -E "RESULT|^variant|^fast|Error|error" | cut -c 1-1500
if [ -n "${FINAL_K:-}" ]; then  # tests that need the GPU to themselves (after the timings)
  echo "=== final tests $(date +%T)"
  timeout "${FINAL_S:-150}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short $T \
    -k "$FINAL_K" > "$OUT/final.log" 2>&1; echo "exit $?" >> "$OUT/final.log"
  grep -E "PASSED|FAILED|ERROR|exit" "$OUT/final.log" | tail -10
fi
echo "=== done $(date +%T)"
