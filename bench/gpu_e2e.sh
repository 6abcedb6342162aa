#!/usr/bin/env bash
# The GPU pass of issue 7 on the device machine: build the 12B-shaped model, benchmark decode
# and training through ragtune's code, run the GPU tests, and the SFT -> ask end to end.
#
# On the device (one `run` call starts it in the background and waits; later calls wait on):
#   bash bench/gpu_e2e.sh start [STAGES]   # default: env build decode train tests e2e
#   bash bench/gpu_e2e.sh wait SECONDS     # wait for the pass (or SECONDS), copy logs to $OUT
#
# The pass runs detached (setsid) from a private copy of the repository, so it goes on
# between calls and a re-sync of the working tree does not touch it. Everything lands in
# $R (/tmp/rt): logs/<stage>.log, summary.txt (one line per stage: exit status, seconds, peak
# GPU memory), decode.jsonl, train.jsonl. A stage that already succeeded on this machine is
# skipped, so `start` after a failure redoes only what is missing.
#
# Needs (carried in .gpu/): site.tgz (the make-bundle.sh packages), smol_tok/ (SmolLM2's
# tokenizer), bert_tok/ (a BERT uncased tokenizer for the BGE-base-shaped embedder).
set -u
R=${RAGTUNE_GPU_ROOT:-/tmp/rt}
SRC=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$R/logs"

env_setup() {
  export PYTHONPATH="$REPO:/tmp/pk:/tmp/s/whl:/tmp/s/site${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export UNSLOTH_DISABLE_STATISTICS=1 ANONYMIZED_TELEMETRY=False TOKENIZERS_PARALLELISM=false
  export PYTHONUNBUFFERED=1 RAGTUNE_OUTPUTS="$R/outputs"
  export RAGTUNE_GPU_TOKENIZER="$REPO/.gpu/smol_tok" RAGTUNE_GPU_BERT_TOKENIZER="$REPO/.gpu/bert_tok"
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
}

# stage NAME CMD... : run CMD with its log, wall time and peak GPU memory (nvidia-smi samples)
stage() {
  local name=$1; shift
  if [ -e "$R/ok.$name" ]; then echo "skip $name (done)"; return 0; fi
  echo "=== $name: $*" | tee -a "$R/master.log"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
    > "$R/logs/$name.gpumem" 2>/dev/null &
  local smi=$!
  local t0=$SECONDS
  (cd "$REPO" && "$@") > "$R/logs/$name.log" 2>&1
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  local peak; peak=$(sort -n "$R/logs/$name.gpumem" 2>/dev/null | tail -1)
  echo "$name rc=$rc seconds=$((SECONDS - t0)) gpu_peak_mib=${peak:-?}" | tee -a "$R/summary.txt"
  [ $rc -eq 0 ] && touch "$R/ok.$name"
  return $rc
}

run_pass() {
  env_setup
  local stages=${*:-env build decode train e2e tests}
  local M="$R/nemo12b" E="$R/bge-base-random"
  local Q="Who designed the breakwater?"
  for s in $stages; do
    case $s in
      env)
        stage env bash -c 'nvidia-smi; df -h /tmp; free -g; python3 -c "
import torch, transformers, peft, trl, datasets, bitsandbytes, torchao, chromadb, hydra, langchain_core
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
for m in (transformers, peft, trl, datasets, bitsandbytes, torchao, chromadb, hydra, langchain_core):
    print(m.__name__, m.__version__)
import unsloth; print(\"unsloth\", unsloth.__version__)
import ragtune.training.recipe, ragtune.fastdecode, ragtune.retriever, ragtune.ingest, ragtune.generate
print(\"ragtune imports ok\")"' ;;
      build)
        stage build python3 bench/make_nemo_shape.py --out "$M" --tokenizer .gpu/smol_tok \
          --embedder-out "$E" --embedder-tokenizer .gpu/bert_tok ${BUILD_ARGS:-} ;;
      smol)  # the embedded CPU models, carried in pieces: cat /tmp/gx/p* is a tar of pk/
        stage smol bash -c 'cat /tmp/gx/p* | tar xzf - -C /tmp && ls -la /tmp/pk/* &&
          python3 -c "from ragtune.models import prepare_smollm2 as p; print(p())"' ;;
      squad)  # issue 6 tuning sweeps with SmolLM2-135M (bench/squad_sweep.sh)
        stage squad env SQ="$REPO/.gx/sq" PLAN="${PLAN:-round1}" bash bench/squad_sweep.sh "$R/sq" ;;
      embed)  # issue 3's GPU figure: the BGE-base-shaped embedder, fp16, batch 256
        stage embed python3 bench/retrieval.py .gx/squad2-public.json --embedding-model "$E" --device cuda --batch-size 256 \
          --chunk-sizes 1000 --layouts article --modes dense --max-questions 200 --workdir "$R/embed" ${EMBED_ARGS:-} ;;
      decode)
        stage decode python3 bench/decode.py --model "$M" --json "$R/decode.jsonl" ${DECODE_ARGS:-} ;;
      train)
        stage train python3 bench/train_throughput.py --model "$M" --json "$R/train.jsonl" ${TRAIN_ARGS:-} ;;
      tests)
        stage tests python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider ${TEST_ARGS:-} \
          ${TEST_K:+-k "$TEST_K"} ;;
      othertests)
        stage othertests python3 -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_gpu.py ;;
      e2e)
        local common=(conf=nemo_rag "model.name_or_path=$M" "retriever.embedding_model=$E"
                      data.max_records=24 train.max_steps=4 train.logging_steps=1)
        stage sft_4bit python3 train/sft.py "${common[@]}" train.save_method=merged_4bit \
          "hydra.run.dir=$R/runs/m4" && \
        stage ask_4bit python3 serve/ask.py "model_dir=$R/runs/m4/model" "question=$Q" json=true
        # keep the disk under its 64 GB: the 4-bit merge goes before the 16-bit one lands
        [ -d "$R/runs/m4/model" ] && du -sh "$R/runs/m4/model" >> "$R/summary.txt" && \
          cp "$R/runs/m4/model/manifest.json" "$R/logs/manifest_4bit.json" 2>/dev/null
        rm -rf "$R/runs/m4/model"
        stage sft_16bit python3 train/sft.py "${common[@]}" train.save_method=merged_16bit \
          "hydra.run.dir=$R/runs/m16"
        stage ask_16bit python3 serve/ask.py "model_dir=$R/runs/m16/model" "question=$Q" json=true
        stage ask_16bit_fast python3 serve/ask.py "model_dir=$R/runs/m16/model" "question=$Q" \
          json=true generate.fast=true generate.stream=false
        [ -d "$R/runs/m16/model" ] && du -sh "$R/runs/m16/model" >> "$R/summary.txt" && \
          cp "$R/runs/m16/model/manifest.json" "$R/logs/manifest_16bit.json" 2>/dev/null
        ;;
      *) echo "unknown stage $s" | tee -a "$R/summary.txt" ;;
    esac
  done
  echo "pass finished $(date)" >> "$R/summary.txt"
  touch "$R/finished"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp "$R/summary.txt" "$OUT/" 2>/dev/null
  cp "$R/decode.jsonl" "$R/train.jsonl" "$OUT/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$R" logs master.log 2>/dev/null
  if [ -d "$R/sq" ]; then  # squad sweeps: summaries, logs, per-run metrics (no models)
    (cd "$R/sq" && find . \( -name 'summary.*' -o -name '*.log' -o -name metrics.json \
      -o -name results.md -o -name 'overrides.yaml' -o -name stats.json -o -name summary.txt \
      -o -name answers.jsonl \) -print0 | tar czf "$OUT/squad.tgz" --null -T - 2>/dev/null)
  fi
}

case ${1:-} in
  start)
    shift
    rm -f "$R/finished"
    if [ ! -d /tmp/s/site ] && [ -e "$SRC/.gpu/site.tgz" ]; then
      mkdir -p /tmp/s && tar xzf "$SRC/.gpu/site.tgz" -C /tmp/s
    fi
    # WHEELS=folder: extra pure-Python wheels (e.g. gemlite), installed beside the bundle
    if [ -n "${WHEELS:-}" ] && [ ! -d /tmp/s/whl ]; then
      python3 -m pip install -q --no-deps --no-index --target /tmp/s/whl "$WHEELS"/*.whl
    fi
    REPO="$R/repo"
    rm -rf "$REPO" && mkdir -p "$REPO"
    (cd "$SRC" && tar cf - --exclude=./.git --exclude=./.gpu/site.tgz --exclude=./.venv --exclude=./outputs --exclude=./unsloth_compiled_cache .) | tar xf - -C "$REPO"
    export REPO
    setsid nohup bash "$REPO/bench/gpu_e2e.sh" _pass "$@" > "$R/master.log" 2>&1 < /dev/null &
    sleep 2
    exec bash "$SRC/bench/gpu_e2e.sh" wait "${WAIT:-540}"
    ;;
  _pass)
    shift
    REPO=${REPO:-$SRC}
    run_pass "$@"
    ;;
  wait)
    limit=${2:-540}
    t0=$SECONDS
    while [ ! -e "$R/finished" ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
    collect
    echo "--- summary"; cat "$R/summary.txt" 2>/dev/null
    [ -e "$R/finished" ] && echo "--- FINISHED" || echo "--- still running"
    for f in decode train; do
      [ -e "$R/logs/$f.log" ] && { echo "--- $f table"; grep -A 30 "^variant \|^backend \|^label " "$R/logs/$f.log" | cut -c 1-200; }
    done
    last=$(ls -t "$R"/logs/*.log 2>/dev/null | head -1)
    [ -n "$last" ] && { echo "--- tail of $last"; tail -c 4000 "$last"; }
    ;;
  *)
    echo "usage: $0 start [stages] | wait SECONDS"; exit 2 ;;
esac
