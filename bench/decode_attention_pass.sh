#!/usr/bin/env bash
# One device call for issue 20 item 1 (the decode step's attention kernel, dec4 -> dec5):
#  1. the kernel alone at the 12B shape (bench/decode_attention_micro.py): main's kernel
#     (BEFORE/decode_attention_kernel.py) and this tree's at a few settings, same inputs;
#  2. the kernel's GPU test;
#  3. the 12B decode benchmark with the fastest setting at bucket 768 (after), main's kernel
#     in its place in the same process and graphs (before, --before-kernel);
#  4. the same benchmark in a copy of this tree with BEFORE's files (main: its kernel and
#     int4 GEMV kernel), a separate process: the whole "main -> this tree" step;
#  5. the remaining GPU tests, most important first.
#
#   WHEELS=<gemlite wheel folder> BEFORE=<folder with main's ragtune files> \
#     MICRO_S=90 DECODE_S=110 BASE_S=90 TESTS_S=100 bash bench/decode_attention_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/, bert_tok/); writes
# gpu.txt, micro.jsonl, decode*.log/jsonl and tests*.log to $OUT as each stage ends.
set -u
OUT=${OUT:-/tmp/dec5out}
REPO=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=$(cd "${BEFORE:?set BEFORE}" && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
T=tests/test_gpu.py
echo "=== micro $(date +%T)"
timeout "${MICRO_S:-90}" python3 bench/decode_attention_micro.py --before-kernel "$BEFORE/decode_attention_kernel.py" \
  --configs "${CONFIGS:-64x4x16,64x8x16,32x4x32,32x8x32,128x8x16,32x4x16}" --buckets 768,2048 \
  --json "$OUT/micro.jsonl" > "$OUT/micro.log" 2>&1
echo "exit $?" >> "$OUT/micro.log"
tail -c 1500 "$OUT/micro.log"
# the fastest setting at bucket 768 (the benchmark's: 512-token prompt + 128 new) among those
# whose outputs are within 0.01 of main's kernel's
CFG=$(python3 -c "
import json, sys
rows = [json.loads(l) for l in open('$OUT/micro.jsonl')]
t = next(r['us_per_launch'] for r in rows if r['bucket'] == 768)
ok = [k for k in t if k != 'before' and 'maxdiff' not in k and t.get(k + '_maxdiff_vs_before', 0) < 0.01]
print(min((t[k], k) for k in ok)[1])
" 2>/dev/null || echo 64x4x16)
echo "setting: $CFG"
echo "=== kernel test $(date +%T)"
timeout "${KTEST_S:-45}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short \
  $T::test_fastdecode_decode_attention_kernel_equals_float64_and_replays_in_a_graph > "$OUT/tests_kernel.log" 2>&1
echo "exit $?" >> "$OUT/tests_kernel.log"
grep -E "PASSED|FAILED|ERROR|exit|Error" "$OUT/tests_kernel.log" | tail -5
echo "=== decode $(date +%T)"
timeout "${DECODE_S:-110}" python3 bench/decode.py --random --model .gpu/smol_tok \
  --variants fast_bnb4 --batches "" --profile --repeats 3 --attention-config "$CFG" \
  --before-kernel "$BEFORE/decode_attention_kernel.py" --json "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1
echo "exit $?" >> "$OUT/decode.log"
grep -E "^fast|Error|error|exit" "$OUT/decode.log" | cut -c 1-1500
echo "=== decode, main's kernels (a copy of this tree with BEFORE's files) $(date +%T)"
rm -rf /tmp/base && cp -r "$REPO" /tmp/base && cp "$BEFORE"/*.py /tmp/base/ragtune/
(cd /tmp/base && PYTHONPATH="/tmp/base:/tmp/s/whl:/tmp/s/site" timeout "${BASE_S:-90}" python3 bench/decode.py \
  --random --model .gpu/smol_tok --variants fast_bnb4 --batches "" --profile --repeats 3 \
  --before-kernel none --json "$OUT/decode_main.jsonl" > "$OUT/decode_main.log" 2>&1
echo "exit $?" >> "$OUT/decode_main.log")
grep -E "^fast|Error|error|exit" "$OUT/decode_main.log" | cut -c 1-1000
echo "=== tests $(date +%T)"
timeout "${TESTS_S:-100}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short \
  $T::test_fastdecode_int4_equals_hf_generate_on_the_int4_weights \
  $T::test_int4_linear_runs_one_row_through_the_gemv_compiled_and_graphed \
  $T::test_fastdecode_cache_buckets_and_prompt_graphs_equal_slow_path \
  "$T::test_fastdecode_compiled_equals_slow_path[manual]" \
  $T::test_fastdecode_int4_prompt_path \
  > "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
grep -E "PASSED|FAILED|ERROR|exit|passed|failed" "$OUT/tests.log" | tail -15
echo "=== done $(date +%T)"
