#!/usr/bin/env bash
# Issues 21.5 and 22.3 on the GPU machine: QA generated from the training articles and a tuned
# embedder, each fed to the answer-or-abstain study's pipeline (bench/squad_abstain_prep.py ->
# bench/squad_abstain_gpu.py -> bench/squad_abstain_report.py), seed 0's split.
#
# The machine is bare and keeps /tmp only while warm (seconds between calls), and a call
# carries 64 MiB, so one chain of three calls, each started as soon as the last returns:
#   embed  carries $Q (code.tgz: the worktree; data.tgz: the split without indexes, train5.jsonl
#          = its training articles minus the validation article; tok.tar.xz: SmolLM2's tokenizer;
#          site.tar.xz: ragtune's pure-Python dependencies + chromadb + rapidfuzz for py3.12;
#          minilm16.tar.xz: all-MiniLM-L6-v2 in float16, widened back to float32 here):
#          train/embed_ft.py, then the packs with the tuned retriever (train + eval contexts).
#   stash  carries the GGUF's first 60 MiB (.carry/abstain-p1/p1) into /tmp.
#   lm     carries the rest (gx/p2): SmolLM2 in float32; raft_rag/ft_then_rag/base_rag on the
#          tuned packs in the background; train/gen_qa.py on the training articles, its packs,
#          raft_rag on the generated QA; rows and logs to $OUT.
#   Q=.carry/quality bash bench/squad_quality_gpu.sh embed|stash|lm [WAIT_SECONDS]
set -u
R=$(pwd)
Q=$R/${Q:-.carry/quality}
W=/tmp/q
mkdir -p $W/rows $W/logs
export PYTHONPATH="$W/code:$W/site2" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 RAGTUNE_TF32=1 ANONYMIZED_TELEMETRY=False
export RAGTUNE_CACHE=$W/cache RAGTUNE_OUTPUTS=$W/outputs
OUT=${OUT:-/tmp/out}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
ts() { date +%s.%N; }
took() { python3 -c "print(round($(ts) - $1, 1))"; }

code() {  # the worktree's code (a later call may bring a newer code.tgz)
  rm -rf $W/code && mkdir -p $W/code && tar xzf "$Q/code.tgz" -C $W/code
}

case "${1:-}" in
embed)
  t=$(ts)
  cd $W && tar xJf "$Q/site.tar.xz" && tar xJf "$Q/minilm16.tar.xz" && tar xzf "$Q/data.tgz" \
    && tar xJf "$Q/tok.tar.xz" || exit 1
  code
  python3 - <<'EOF' || exit 1
import shutil, torch
from safetensors.torch import load_file, save_file
shutil.copytree("/tmp/q/minilm16", "/tmp/q/minilm", dirs_exist_ok=True)
sd = load_file("/tmp/q/minilm16/model.safetensors")
wide = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
save_file(wide, "/tmp/q/minilm/model.safetensors", metadata={"format": "pt"})
print("torch", torch.__version__, torch.cuda.get_device_name(0))
EOF
  echo "unpack $(took "$t") s"
  cd $W/code
  S=$W/data/s0
  t=$(ts)
  python3 train/embed_ft.py data.corpus=$S/corpus_train data.qa_train=$S/train5.jsonl \
    retriever.embedding_model=$W/minilm retriever.persist_dir=$W/idx/embft \
    embed_ft.save_dir=$W/emb_tuned > $W/logs/embed_ft.log 2>&1
  echo "embed_ft rc=$? wall $(took "$t") s"
  tail -15 $W/logs/embed_ft.log
  t=$(ts)
  python3 bench/squad_abstain_prep.py $S $W/packs/s0t --variants contrast,closed \
    --set retriever.embedding_model=$W/emb_tuned --set model.name_or_path=$W/tok \
    > $W/logs/prep_s0t.log 2>&1
  echo "prep tuned rc=$? wall $(took "$t") s"
  tail -5 $W/logs/prep_s0t.log
  cp $W/logs/*.log $W/emb_tuned/manifest.json "$OUT/" 2>/dev/null
  tar czf "$OUT/packs_s0t.tgz" -C $W/packs s0t
  ;;
stash)
  mkdir -p $W/gx && cp "$R/.carry/abstain-p1/p1" $W/gx/p1 && ls -la $W/gx $W
  ;;
lm)
  code
  t=$(ts)
  cat $W/gx/p1 "$Q/p2" > $W/gx/$GGUF && rm $W/gx/p1
  python3 -c "
from pathlib import Path
from ragtune.models import _convert_gguf
_convert_gguf(Path('$W/gx'), '$GGUF', Path('$W/smol'))" > $W/logs/convert.log 2>&1 \
    || { tail -20 $W/logs/convert.log; exit 1; }
  echo "convert $(took "$t") s"
  cd $W/code
  t0=$SECONDS
  run() {  # PACK VARIANT NAME
    python3 bench/squad_abstain_gpu.py --model $W/smol --pack $W/packs/$1 --variant $2 \
      --tag "$1" --out $W/rows/$3.jsonl > $W/logs/$3.log 2>&1 &
  }
  run s0t contrast s0t_contrast
  run s0t closed s0t_closed
  run s0t base s0t_base
  t=$(ts)
  python3 train/gen_qa.py data.corpus=$W/data/s0/corpus_train model.name_or_path=$W/smol \
    retriever.embedding_model=$W/minilm retriever.persist_dir=$W/idx/gen \
    gen_qa.out_dir=$W/gen gen_qa.num_chunks="${CHUNKS:-0}" gen_qa.batch_size=64 \
    > $W/logs/gen_qa.log 2>&1
  echo "gen_qa rc=$? wall $(took "$t") s"
  tail -4 $W/logs/gen_qa.log
  G=$W/data/s0g
  mkdir -p $G && cp -r $W/data/s0/{corpus,corpus_train,test.jsonl} $G/ && cp $W/gen/qa.jsonl $G/train.jsonl
  t=$(ts)
  python3 bench/squad_abstain_prep.py $G $W/packs/s0g --variants contrast,plain \
    --set retriever.embedding_model=$W/minilm --set model.name_or_path=$W/tok \
    > $W/logs/prep_s0g.log 2>&1
  echo "prep generated rc=$? wall $(took "$t") s"
  cat $W/logs/prep_s0g.log | grep -v Warn | tail -6
  run s0g contrast s0g_contrast
  run s0g plain s0g_plain
  limit=${2:-480}
  while [ -n "$(jobs -r)" ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
  echo "waited $((SECONDS - t0)) s; running: $(jobs -r | wc -l)"
  for f in $W/logs/s0*.log; do echo "== $f"; tail -2 "$f"; done
  cp $W/gen/report.json $W/gen/preview.md "$OUT/" 2>/dev/null
  tar czf "$OUT/rows.tgz" -C $W rows logs gen/qa.jsonl packs/s0g/split.json
  ;;
*)
  echo "usage: Q=.carry/quality bash bench/squad_quality_gpu.sh embed|stash|lm [WAIT]" >&2
  exit 2
  ;;
esac
