#!/usr/bin/env bash
# One device call for issue 20 item 1, RAGTUNE_FUSED_DOWN (helper dec6: built without a GPU):
#  1. the fused op's GPU test at the 12B down shape (prints its error and its agreement with
#     the unfused GEMV fed inductor's SiLU(gate) * up);
#  2. the batch-1 12B decode benchmark with RAGTUNE_FUSED_DOWN=off, =on (staged), =inline (RUNS), each
#     in its own process (the switch is read when the int4 layers are built);
#  3. the decoder's GPU tests: tokens with the switch on and inline (the fused op in every layer), and
#     the unfused int4 tests as they stand.
#
#   WHEELS=<gemlite wheel folder> RUNS="off on inline" KTEST_S=100 DECODE_S=95 TESTS_S=120 \
#     bash bench/fused_down_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/, bert_tok/); writes
# gpu.txt, tests_kernel.log, decode_<mode>_<i>.log/jsonl and tests.log to $OUT as each ends.
set -u
OUT=${OUT:-/tmp/dec6out}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
T=tests/test_gpu.py
echo "=== kernel test $(date +%T)"
timeout "${KTEST_S:-100}" python3 -m pytest -m gpu -v -s -rA -p no:cacheprovider --tb=short \
  $T::test_int4_fused_down_equals_float64_and_replays_in_a_graph > "$OUT/tests_kernel.log" 2>&1
echo "exit $?" >> "$OUT/tests_kernel.log"
grep -E "err |PASSED|FAILED|ERROR|exit|Error" "$OUT/tests_kernel.log" | tail -12 | cut -c 1-300
i=0
for mode in ${RUNS:-off on inline}; do
  i=$((i + 1))
  name="decode_${mode}_$i"
  echo "=== $name $(date +%T)"
  RAGTUNE_FUSED_DOWN=$mode timeout "${DECODE_S:-95}" python3 bench/decode.py --random \
    --model .gpu/smol_tok --variants fast_bnb4 --batches "" --profile --repeats 3 \
    --json "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1
  echo "exit $?" >> "$OUT/$name.log"
  grep -E "^fast|Error|error|exit" "$OUT/$name.log" | cut -c 1-800
done
echo "=== tests $(date +%T)"
timeout "${TESTS_S:-120}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short \
  $T::test_fastdecode_int4_fused_down_keeps_the_tokens \
  $T::test_fastdecode_int4_equals_hf_generate_on_the_int4_weights \
  $T::test_int4_linear_runs_one_row_through_the_gemv_compiled_and_graphed \
  > "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
grep -E "PASSED|FAILED|ERROR|exit|passed|failed" "$OUT/tests.log" | tail -8
echo "=== done $(date +%T)"
