#!/usr/bin/env bash
# The lead's device pass on merged main (issue 20): the batch-1 12B decode benchmark, the server
# with 32 connected clients (the default, then the compiled prompt forward in its own process,
# so a slow compile cannot cost the default's figures), then the GPU tests named in TESTS.
# A stage named decode_<m>, serve_<m> or tests_<m> runs with RAGTUNE_PDL=<m> (ragtune.pdl).
#
#   WHEELS=<gemlite wheel folder> PYX=<fastapi/uvicorn/httpx folder> STAGES="decode serve serve_cp tests" \
#     DECODE_S=90 SERVE_S=130 CP_S=220 TESTS_S=100 TESTS="tests/test_gpu.py::..." bash bench/verify_pass.sh
#
# Run from a copy of the repository holding .gpu/ (site.tgz, smol_tok/, bert_tok/); writes each
# stage's log (and the benchmarks' JSON lines) to $OUT as it ends.
set -u
OUT=${OUT:-/tmp/verifyout}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/gpu_env.sh
source "$REPO/bench/gpu_env.sh"
export PYTHONPATH="$PYTHONPATH:${PYX:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "commit ${COMMIT:-unknown}" | tee -a "$OUT/gpu.txt"
STAGES=${STAGES:-decode serve serve_cp tests}

serve() {  # serve NAME SECONDS [env...]: 32 connected clients, two waves, 8 one at a time
  local name=$1 s=$2; shift 2
  env "$@" timeout "$s" python3 bench/serve_load.py --random --model .gpu/smol_tok --bnb4 \
    --clients 32 --prompt 512 --new 128 --max-seq-len 1024 --sequential 8 --deadline-s $((s - 25)) \
    --weights fp8 --modes process,process --waves 1 --group 1 --json "$OUT/$name.jsonl" \
    > "$OUT/$name.log" 2>&1
  echo "exit $?" >> "$OUT/$name.log"
  python3 bench/serve_summary.py "$OUT/$name.jsonl" || true
  grep -E "Traceback|Error|exit" "$OUT/$name.log" | tail -5 | cut -c 1-300
}

for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    decode | decode_*)  # decode_<m>: with RAGTUNE_PDL=<m> (ragtune.pdl), its own process
      pdl=${stage#decode}
      env ${pdl:+RAGTUNE_PDL=${pdl#_}} timeout "${DECODE_S:-90}" python3 bench/decode.py --random \
        --model .gpu/smol_tok --variants fast_bnb4 --batches "" --profile --repeats 3 \
        --json "$OUT/$stage.jsonl" > "$OUT/$stage.log" 2>&1
      echo "exit $?" >> "$OUT/$stage.log"
      grep -E "^fast|Error|exit" "$OUT/$stage.log" | cut -c 1-600 ;;
    serve) serve serve "${SERVE_S:-130}" ;;
    serve_cp) serve serve_cp "${CP_S:-220}" RAGTUNE_PREFILL_COMPILE=on ;;
    serve_*) serve "$stage" "${SERVE_S:-130}" RAGTUNE_PDL="${stage#serve_}" ;;
    tests | tests_*)  # tests_<m>: with RAGTUNE_PDL=<m>
      pdl=${stage#tests}
      # shellcheck disable=SC2086
      env ${pdl:+RAGTUNE_PDL=${pdl#_}} timeout "${TESTS_S:-100}" python3 -m pytest -m gpu -v -rA \
        -p no:cacheprovider --tb=short ${TESTS:-tests/test_gpu.py} > "$OUT/$stage.log" 2>&1
      echo "exit $?" >> "$OUT/$stage.log"
      grep -E "PASSED|FAILED|ERROR|exit|passed|failed|^E " "$OUT/$stage.log" | tail -25 | cut -c 1-300 ;;
  esac
done
echo "=== done $(date +%T)"
