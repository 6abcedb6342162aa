#!/usr/bin/env bash
# Issue 6.4: the SQuAD v2 held-out-article benchmark on CPU, end to end (prepare, train the
# co-designed model and the closed-book fine-tune, evaluate all four modes), timed per step.
#
#   bash bench/squad_cpu.sh [OUT]        # default OUT: outputs/bench/squad
#
# The recipe is the one bench/squad_sweep.sh found on a GPU (docs/benchmarks.md): short prompt,
# 300-character chunks, 600 training questions with the unanswerable share capped at 1/3,
# every answerable example keeping its oracle, 2 epochs. Same code and settings as the sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-outputs/bench/squad}
PY=${PYTHON:-.venv/bin/python}
SQUAD=${SQUAD:-../shared/data/squad2-public/squad2-public.json}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$B"
R=(prompt=alpaca_rag_short retriever.chunk_size=300 retriever.chunk_overlap=30
   model.max_seq_length=384)
T=(raft.oracle_fraction=1.0 raft.unanswerable_fraction=0.33 train.num_train_epochs=2 train.per_device_train_batch_size=8
   train.learning_rate=5e-4 data.corpus=$B/corpus_train data.qa_train=$B/train.jsonl
   retriever.persist_dir=$B/index_train)

step() {  # step NAME CMD... : run, log, time
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$B/timing.txt"
  local t0=$SECONDS
  "$@" > "$B/$name.log" 2>&1
  echo "$name seconds=$((SECONDS - t0))" | tee -a "$B/timing.txt"
}

t_all=$SECONDS
: > "$B/timing.txt"
step prepare "$PY" train/prepare_squad.py "$SQUAD" "$B" --test-fraction 0.25 --seed 0 \
  --max-train 600 --max-test 300
step raft "$PY" train/sft.py "${R[@]}" "${T[@]}" "hydra.run.dir=$B/runs/raft"
step closed "$PY" train/sft.py "${R[@]}" "${T[@]}" raft.mode=closed "hydra.run.dir=$B/runs/closed"
step eval "$PY" train/eval.py "${R[@]}" data.corpus=$B/corpus data.qa_eval=$B/test.jsonl \
  retriever.persist_dir=$B/index_all generate.max_new_tokens=32 \
  eval.models.ft_closed=$B/runs/closed/model eval.models.raft_rag=$B/runs/raft/model \
  "hydra.run.dir=$B/runs/eval"
echo "total seconds=$((SECONDS - t_all))" | tee -a "$B/timing.txt"
cat "$B/runs/eval/results.md"
