#!/usr/bin/env bash
# The SQuAD v2 held-out-article benchmark on CPU, end to end, timed per step: prepare the split,
# hold one training article out for validation, train the co-designed model and the
# closed-book fine-tune, fit raft_rag's answer-or-abstain decision on the validation article
# (written into its manifest), then evaluate all four modes on the test articles.
#
#   bash bench/squad_cpu.sh [OUT] [SEED]     # default OUT: outputs/bench/squad, SEED 0
#
# The training recipe is the one bench/squad_sweep.sh found on a GPU (docs/benchmarks.md): short
# prompt, 300-character chunks, 600 training questions with the unanswerable share capped at
# 1/3, every answerable example keeping its oracle, 2 epochs. RAFT_EXTRA adds raft/train keys
# (e.g. RAFT_EXTRA="raft.contrastive=true raft.unanswerable_on_topic=true").
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-outputs/bench/squad}
SEED=${2:-0}
PY=${PYTHON:-.venv/bin/python}
SQUAD=${SQUAD:-../shared/data/squad2-public/squad2-public.json}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$B"
R=(prompt=alpaca_rag_short retriever.chunk_size=300 retriever.chunk_overlap=30
   model.max_seq_length=384)
# shellcheck disable=SC2206
T=(raft.oracle_fraction=1.0 raft.unanswerable_fraction=0.33 train.num_train_epochs=2
   train.per_device_train_batch_size=8 train.learning_rate=5e-4 data.corpus=$B/corpus_train
   data.qa_train=$B/train_fit.jsonl retriever.persist_dir=$B/index_train ${RAFT_EXTRA:-})
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
  --max-train 0 --max-test 300
# one training article held out (by source) to fit the decision; 600 questions of the rest train
step validation "$PY" -c "
import json, sys; sys.path.insert(0, '.')
from ragtune.answerability import split_by_source
from ragtune.qa import load_qa, record_to_json, sample_records
train, val = split_by_source(load_qa('$B/train.jsonl'), 1, $SEED)
for name, recs in (('train_fit', sample_records(train, 600, $SEED)), ('val', sample_records(val, 200, $SEED))):
    open('$B/' + name + '.jsonl', 'w').writelines(json.dumps(record_to_json(r)) + chr(10) for r in recs)
print(len(train), len(val), sorted({r.source for r in val}))"
step raft "$PY" train/sft.py "${R[@]}" "${T[@]}" "hydra.run.dir=$B/runs/raft"
step closed "$PY" train/sft.py "${R[@]}" "${T[@]}" raft.mode=closed "hydra.run.dir=$B/runs/closed"
step eval_val "$PY" train/eval.py "${E[@]}" data.corpus=$B/corpus_train data.qa_eval=$B/val.jsonl \
  retriever.persist_dir=$B/index_train 'eval.modes=[raft_rag]' \
  eval.models.raft_rag=$B/runs/raft/model "hydra.run.dir=$B/runs/eval_val"
step calibrate "$PY" bench/squad_calibrate.py "$B/runs/eval_val" "$B/runs/raft/model"
step eval "$PY" train/eval.py "${E[@]}" data.corpus=$B/corpus data.qa_eval=$B/test.jsonl \
  retriever.persist_dir=$B/index_all \
  eval.models.ft_closed=$B/runs/closed/model eval.models.raft_rag=$B/runs/raft/model \
  "hydra.run.dir=$B/runs/eval"
echo "total seconds=$((SECONDS - t_all))" | tee -a "$B/timing.txt"
cat "$B/runs/eval/results.md"
