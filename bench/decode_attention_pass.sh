#!/usr/bin/env bash
# One device call for issue 20 item 1 (dec4: the decode step's attention as one kernel a layer):
# the 12B decode benchmark (after = ragtune::decode_attention_write's kernel, before = the same
# process and graphs with the matmul attention), then the GPU tests, most important first.
#
#   WHEELS=<folder with the gemlite wheel> DECODE_S=140 TESTS_S=120 bash bench/decode_attention_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/, bert_tok/); writes
# gpu.txt, decode.log + decode.jsonl and tests.log to $OUT as each stage ends.
set -u
OUT=${OUT:-/tmp/dec4out}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
echo "=== decode $(date +%T)"
timeout "${DECODE_S:-140}" python3 bench/decode.py --random --model .gpu/smol_tok \
  --variants fast_bnb4 --batches "" --profile --repeats 3 --json "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1
echo "exit $?" >> "$OUT/decode.log"
grep -E "^fast|Error|error|exit" "$OUT/decode.log" | cut -c 1-1500
echo "=== tests $(date +%T)"
T=tests/test_gpu.py
timeout "${TESTS_S:-120}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short \
  $T::test_fastdecode_decode_attention_kernel_equals_float64_and_replays_in_a_graph \
  $T::test_fastdecode_cache_buckets_and_prompt_graphs_equal_slow_path \
  $T::test_fastdecode_int4_equals_hf_generate_on_the_int4_weights \
  "$T::test_fastdecode_compiled_equals_slow_path[manual]" \
  "$T::test_fastdecode_compiled_equals_slow_path[trees]" \
  $T::test_fastdecode_int4_prompt_path \
  $T::test_int4_linear_runs_one_row_through_the_gemv_compiled_and_graphed \
  > "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
grep -E "PASSED|FAILED|ERROR|exit|passed|failed" "$OUT/tests.log" | tail -15
echo "=== done $(date +%T)"
