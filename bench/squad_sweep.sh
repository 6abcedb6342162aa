#!/usr/bin/env bash
# Issue 6 tuning on a GPU: the SQuAD v2 held-out-article benchmark swept over the settings that
# CPU training can afford (a few hundred records of ~300 tokens), to find what moves raft_rag
# before the one-hour CPU run. Same model (SmolLM2-135M, dequantized from the embedded GGUF),
# same dtype (float32), same backend (hf) and the same code as on CPU: only the device differs.
#
#   SQ=.gx/sq PLAN=round1|round2 bash bench/squad_sweep.sh [OUTROOT]
#
# SQ holds train/prepare_squad.py splits of ../shared/data/squad2-public/squad2-public.json,
# made with --test-fraction 0.25 --seed 0 --max-test 0 and --max-train 150|300|600|1200 into
# s150 s300 s600 s1200 (the test set and articles are the same in all four). Every sweep
# trains on the training articles' index and evaluates raft_rag on all held-out questions
# against the whole corpus; each sweep folder ends with summary.csv / .md / .png. Then the
# baseline recipe is evaluated under all four modes (train/eval.py).
set -u
SQ=${SQ:-.gx/sq}
SQ=$(cd "$SQ" && pwd)
R=${1:-/tmp/sq}
mkdir -p "$R/logs"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3

# The baseline recipe: the demo's short-prompt settings at the CPU scale.
declare -A BASE=(
  [prompt]=alpaca_rag_short
  [retriever.chunk_size]=300
  [retriever.chunk_overlap]=30
  [model.max_seq_length]=384
  [model.dtype]=float32
  [train.backend]=hf
  [train.num_train_epochs]=2
  [train.per_device_train_batch_size]=8
  [train.learning_rate]=5e-4
  [train.save_steps]=100000
  [raft.oracle_fraction]=0.8
  [data.corpus]=$SQ/s300/corpus_train
  [data.qa_train]=$SQ/s300/train.jsonl
  [data.qa_eval]=$SQ/s300/test.jsonl
  [generate.max_new_tokens]=32
  [eval.corpus]=$SQ/s300/corpus
  [eval.batch_size]=32
)

# overrides NAME KEY=VALUE... : the baseline with these keys replaced (swept keys included)
overrides() {
  local name=$1; shift
  declare -A o
  local k
  for k in "${!BASE[@]}"; do o[$k]=${BASE[$k]}; done
  local kv
  for kv in "$@"; do o[${kv%%=*}]=${kv#*=}; done
  o[retriever.persist_dir]=$R/idx/${name}_train
  o[eval.persist_dir]=$R/idx/${name}_all
  for k in "${!o[@]}"; do printf '%s=%s\n' "$k" "${o[$k]}"; done
}

# sweep NAME KEY=V1,V2... : a Hydra multirun of train/sft.py with evaluation after each run
sweep() {
  local name=$1; shift
  mapfile -t args < <(overrides "$name" "$@")
  python3 train/sft.py -m "${args[@]}" train.eval_after=true 'eval.modes=[raft_rag]' \
    "hydra.sweep.dir=$R/sweeps/$name" > "$R/logs/sweep_$name.log" 2>&1
  echo "sweep $name rc=$?" >> "$R/summary.txt"
}

# single NAME KEY=V... : one train/sft.py run into $R/runs/NAME
single() {
  local name=$1; shift
  mapfile -t args < <(overrides "$name" "$@")
  python3 train/sft.py "${args[@]}" "hydra.run.dir=$R/runs/$name" > "$R/logs/run_$name.log" 2>&1
  echo "run $name rc=$?" >> "$R/summary.txt"
}

t0=$SECONDS
round1() {  # the demo recipe around its settings (P, chunk, lr/epochs, size, prompt, rank, retrieval)
  sweep chunk retriever.chunk_size=200,300,400 raft.oracle_fraction=0.8,1.0 &
  sweep lr train.learning_rate=2e-4,1e-3 train.num_train_epochs=2,3 &
  sweep size "data.qa_train=$SQ/s150/train.jsonl,$SQ/s600/train.jsonl,$SQ/s1200/train.jsonl" &
  sweep prompt prompt=alpaca_rag,chat_rag &
  (single raft && single closed raft.mode=closed) &
  wait
  echo "group 1 done at $((SECONDS - t0)) s" >> "$R/summary.txt"
  sweep rank train.lora.r=8,64 &
  sweep retrieval retriever.hybrid=true,false retriever.k=3,4 &
  sweep abstain raft.abstain_without_oracle=false,true raft.oracle_fraction=0.6 &
  eval4 eval4 raft closed &
  wait
}

round2() {  # round 1 found "always abstain": the abstention balance, data size and epochs
  local cap=(raft.oracle_fraction=1.0)
  sweep cap "${cap[@]}" raft.unanswerable_fraction=0.2,0.33,0.45 &
  sweep cap600 "${cap[@]}" "data.qa_train=$SQ/s600/train.jsonl" raft.unanswerable_fraction=0.2,0.33 &
  sweep full "data.qa_train=$SQ/s0/train.jsonl" raft.unanswerable_fraction=0.33 \
    raft.oracle_fraction=0.8,1.0 &
  sweep epochs "${cap[@]}" raft.unanswerable_fraction=0.33 train.num_train_epochs=3,4 &
  (single raft2 "${cap[@]}" raft.unanswerable_fraction=0.33 "data.qa_train=$SQ/s600/train.jsonl" &&
    single closed2 raft.mode=closed raft.unanswerable_fraction=0.33 \
      "data.qa_train=$SQ/s600/train.jsonl") &
  wait
  echo "group 1 done at $((SECONDS - t0)) s" >> "$R/summary.txt"
  eval4 eval4b raft2 closed2 &
  sweep lr2 "${cap[@]}" raft.unanswerable_fraction=0.33 "data.qa_train=$SQ/s600/train.jsonl" \
    train.learning_rate=2e-4,1e-3 &
  sweep prompt2 "${cap[@]}" raft.unanswerable_fraction=0.33 "data.qa_train=$SQ/s600/train.jsonl" \
    prompt=chat_rag,alpaca_rag &
  wait
}

# eval4 NAME RAFT_RUN CLOSED_RUN: all four modes (train/eval.py) with those runs' models
eval4() {
  mapfile -t args < <(overrides "$1" | grep -v -E '^(train|raft)\.')  # not eval.py's keys
  python3 train/eval.py "${args[@]}" "eval.models.raft_rag=$R/runs/$2/model" \
    "eval.models.ft_closed=$R/runs/$3/model" "hydra.run.dir=$R/runs/$1" > "$R/logs/$1.log" 2>&1
  echo "$1 rc=$?" >> "$R/summary.txt"
}

"${PLAN:-round1}"
echo "${PLAN:-round1} done at $((SECONDS - t0)) s" >> "$R/summary.txt"
