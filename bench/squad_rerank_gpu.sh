#!/usr/bin/env bash
# A finished bench/squad_product_gpu.sh run's model, refitted and evaluated again with other
# serving settings (paired: the same trained weights, only the decision refitted and the
# evaluation rerun), e.g. the reader reranker of issue 17 (docs/benchmarks.md, session 40):
#
#   SEEDS="0 1" RUN=contrast_chunk VARIANT=rerank6 SETS="retriever.reader_rerank=6" \
#       bash bench/squad_rerank_gpu.sh
#
# For each seed: bench/refit_calibration.py on $SQP/<RUN>_s<SEED>/runs/raft with SETS into a
# copy of its model, then train/eval.py raft_rag on the split's test questions with that copy,
# as bench/squad_cpu.sh's eval step; the seeds run side by side. Results (the copy's manifest,
# its held-out answers, the evaluation) into $OUT/<RUN>_<VARIANT>_s<SEED>.tgz, laid out as
# squad_product_gpu.sh's, so bench/decision_features.py reads them alike. Needs the same setup
# as squad_product_gpu.sh (the bundle, Qwen converted in /tmp/ab/qwen, MiniLM in /tmp/pk).
set -u
OUT=${OUT:-/tmp/sqp/out}
SQP=${SQP:-/tmp/sqp}
SITE=${SITE:-/tmp/s/site}
: "${RUN:?name the squad_product_gpu.sh run, e.g. RUN=contrast_chunk}"
: "${VARIANT:?name this variant, e.g. VARIANT=rerank6}"
export PYTHONPATH="$PWD:/tmp/pk:$SITE:$PWD/.carry/batchsrv/.pyx" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 ANONYMIZED_TELEMETRY=False PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
SET_ARGS=() SET_KEYS=()
for kv in ${SETS:-}; do SET_ARGS+=(--set "$kv"); SET_KEYS+=("$kv"); done
mkdir -p "$OUT"
one() {
  local seed=$1 B=$SQP/${RUN}_s$1 V=$SQP/${RUN}_s$1/$VARIANT
  rm -rf "$V" && mkdir -p "$V"
  # the refit writes its held-out answers into the run's calibration folder: keep the run's own
  cp -r "$B/runs/raft/calibration" "$V/calibration_run"
  python3 bench/refit_calibration.py "$B/runs/raft" "$V/model" "${SET_ARGS[@]}" > "$V/refit.log" 2>&1
  mv "$B/runs/raft/calibration" "$V/calibration_refit" && mv "$V/calibration_run" "$B/runs/raft/calibration"
  # the model's own retriever settings (its manifest, SETS included) on the test index
  python3 train/eval.py conf=qwen_rag prompt=alpaca_rag_short retriever.chunk_size=300 \
    retriever.chunk_overlap=30 model.max_seq_length=384 model=qwen15 model.name_or_path=/tmp/ab/qwen \
    model.dtype=bfloat16 generate.max_new_tokens=32 data.corpus="$B/corpus" data.qa_eval="$B/test.jsonl" \
    retriever.persist_dir="$B/index_all" eval.models.raft_rag="$V/model" "eval.modes=[raft_rag]" \
    "hydra.run.dir=$V/eval" > "$V/eval.log" 2>&1
}
t0=$SECONDS
for seed in ${SEEDS:-0}; do one "$seed" & done
wait
for seed in ${SEEDS:-0}; do
  B=$SQP/${RUN}_s$seed V=$SQP/${RUN}_s$seed/$VARIANT O=$SQP/collect/${RUN}_${VARIANT}_s$seed
  rm -rf "$O" && mkdir -p "$O"
  cp "$V/model/manifest.json" "$O/raft_manifest.json" 2>/dev/null
  cp -r "$V/calibration_refit" "$O/calibration" 2>/dev/null
  cp "$V"/eval/{results.md,metrics.json,answers.jsonl,roc.png} "$O/" 2>/dev/null
  for f in refit eval; do tail -c 100000 "$V/$f.log" > "$O/$f.log" 2>/dev/null; done
  tar czf "$OUT/${RUN}_${VARIANT}_s$seed.tgz" -C "$SQP/collect" "${RUN}_${VARIANT}_s$seed"
  echo "== seed $seed ($VARIANT: ${SET_KEYS[*]}), $((SECONDS - t0)) s"
  cat "$O/results.md" 2>/dev/null || tail -5 "$V/refit.log" "$V/eval.log"
done
