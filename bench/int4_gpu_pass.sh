#!/usr/bin/env bash
# One device call for issue 20.1 (int4 fast decode of a merged 4-bit model): gemlite kernel
# sweep, the 12B decode benchmark with what the sweep chose, and the int4 GPU tests.
#
#   WHEELS=<folder with the gemlite wheel> bash bench/int4_gpu_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/); writes to $OUT:
# kernels.log + kernels.jsonl (sweep), nvidia_h200*.json (chosen settings), decode.log +
# decode.jsonl, tests.log, table.log + table.jsonl. STAGES picks and orders the stages
# (sweep decode tests table); each runs under its own timeout. Without a sweep the packaged
# ragtune/int4_configs/ file is used.
set -u
OUT=${OUT:-/tmp/int4out}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
TUNED="$OUT/nvidia_h200.json"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, gemlite, transformers, bitsandbytes as b
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'triton', triton.__version__,
      'gemlite', gemlite.__version__, 'transformers', transformers.__version__, 'bnb', b.__version__)"
} 2>&1 | tee "$OUT/kernels.log"

STAGES=${STAGES:-sweep decode tests}
T=tests/test_gpu.py
TESTS=${TESTS:-"$T::test_gemlite_keeps_the_layout_the_prompt_path_unpacks $T::test_tuned_int4_configs_reach_gemlite $T::test_fastdecode_serves_a_bnb_4bit_model_in_int4_by_default $T::test_fastdecode_int4_prompt_path $T::test_fastdecode_int4_equals_hf_generate_on_the_int4_weights $T::test_gemlite_int4_matches_the_dequantized_weights"}
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    sweep)
      timeout "${SWEEP_S:-150}" python3 bench/int4_kernels.py --out "$TUNED" \
        --json "$OUT/kernels.jsonl" --budget-s "${BUDGET_S:-90}" 2>&1 |
        tee -a "$OUT/kernels.log" | grep -v '"candidate"'
      [ -f "$TUNED" ] && export RAGTUNE_INT4_CONFIGS="$TUNED" ;;
    table)  # the packaged settings: time and error with bf16 vs float32 atomic adds
      timeout "${TABLE_S:-60}" python3 bench/int4_kernels.py \
        --table ragtune/int4_configs/nvidia_h200.json --json "$OUT/table.jsonl" 2>&1 |
        tee "$OUT/table.log" | grep -E "RESULT|Error" ;;
    decode)
      timeout "${DECODE_S:-200}" python3 bench/decode.py --random --model .gpu/smol_tok \
        --variants fast_bnb4 --batches "" --profile --repeats 3 --json "$OUT/decode.jsonl" 2>&1 |
        tee "$OUT/decode.log" | grep -E "RESULT|^variant|^fast|Error|error" | cut -c 1-1500 ;;
    tests)
      # shellcheck disable=SC2086
      timeout "${TESTS_S:-160}" python3 -m pytest -m gpu -v -rA -p no:cacheprovider --tb=short \
        $TESTS 2>&1 | tee "$OUT/tests.log" | tail -60 ;;
  esac
done
echo "=== done $(date +%T)"
