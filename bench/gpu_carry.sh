#!/usr/bin/env bash
# Build what a device call carries (the GPU machine has torch, transformers, peft and a few more,
# but not Unsloth, ragtune's stack, gemlite or the tokenizers), from a repository after
# `make install`:
#
#   bash bench/gpu_carry.sh        # -> .gpu/{site.tgz,smol_tok,bert_tok,READY},
#                                  #    .carry/gpu-whl/*.whl, .carry/batchsrv/.pyx/
#
# then carry [".gpu", ".carry/gpu-whl", ".carry/batchsrv/.pyx"] (about 50 MiB of the 64 allowed)
# and start the device command as bench/gpu_env.sh does. Both folders are ignored here
# (/.gpu/ by .gitignore, /.carry/ added to .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo /.carry/ >> .git/info/exclude
mkdir -p .gpu .carry/gpu-whl .carry/batchsrv/.pyx
rm -f .gpu/READY

# 1. The package bundle (Unsloth, bitsandbytes, TRL, datasets, chromadb, hydra, langchain-core ...).
if [ ! -f .gpu/site.tgz ]; then
  raw=$(mktemp -d)
  EXTRA="chromadb==1.5.9 annotated-types==0.8.0 beautifulsoup4==4.15.0 soupsieve==4.1.2 distro==1.9.0 \
  gguf==0.19.0 googleapis-common-protos==1.76.0 hydra-core==1.3.8 omegaconf==2.3.1 httpx2==2.16.2 \
  jsonpatch==1.47 jsonpointer==3.12 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 langchain-core==1.7.2 langchain-text-splitters==1.1.3 \
  langchain-protocol==0.0.20 langsmith==0.15.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-proto==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 orjson==3.13.0 overrides==7.7.0 pybase64==1.5.1 \
  pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 pypdf==7.1.0 \
  rank-bm25==0.2.2 requests-toolbelt==1.0.0 sniffio==1.3.1 tenacity==9.2.1 typing-inspection==0.4.5 \
  uuid-utils==0.19.0 bcrypt==5.0.0 mmh3==5.3.1 importlib-resources==7.1.0 peft==0.21.2 \
  typing-extensions==4.16.0 rapidfuzz==3.14.6"
  # BUNDLE=<a site.tgz that make-bundle.sh wrote with this EXTRA> skips the download.
  if [ -n "${BUNDLE:-}" ]; then cp "$BUNDLE" "$raw/site.tgz"; else
    EXTRA=$EXTRA bash ../shared/gpu/make-bundle.sh "$raw"; fi
  tar xzf "$raw/site.tgz" -C "$raw"
  # antlr4 (hydra's parser runtime) is an sdist only on PyPI, pypika chromadb's: both pure Python.
  for m in antlr4 pypika; do cp -r "$SITE/$m" "$raw/site/"; done
  # What the device never imports and what pushes the carry past 64 MiB.
  rm -rf "$raw"/site/zstandard* "$raw"/site/hf_transfer* "$raw"/site/unsloth_cli "$raw"/site/test \
    "$raw"/site/bitsandbytes/libbitsandbytes_cuda132.so
  find "$raw/site" -name __pycache__ -type d -prune -exec rm -rf {} +
  tar czf .gpu/site.tgz -C "$raw" site
  rm -rf "$raw"
fi

# 2. Tokenizers: SmolLM2's (the random 12B-shaped model uses it) and MiniLM's BERT tokenizer.
smol=$(HF_HUB_OFFLINE=1 $PY -c 'from ragtune.models import smollm2_dir; print(smollm2_dir())')
bert=$(HF_HUB_OFFLINE=1 $PY -c 'from ragtune.models import embedder_dir; print(embedder_dir())')
mkdir -p .gpu/smol_tok .gpu/bert_tok
cp "$smol"/*token* .gpu/smol_tok/
cp "$bert"/vocab.txt "$bert"/*token* .gpu/bert_tok/

# 3. gemlite (pure Python + Triton) as a wheel; the server's packages from the venv, and rapidfuzz
# (oracle detection, imported by train/sft.py), which bundles built before 2026-12-01 lack
# (the device's Python is 3.11, as the venv's: its compiled modules load there).
ls .carry/gpu-whl/gemlite-*.whl >/dev/null 2>&1 || $PY -m pip wheel -q --no-deps -w .carry/gpu-whl gemlite==0.6.0.post2
for m in fastapi starlette uvicorn anyio h11 httpx httpcore click idna certifi annotated_doc rapidfuzz; do
  cp -r "$SITE/$m" .carry/batchsrv/.pyx/
done
find .carry/batchsrv/.pyx -name __pycache__ -type d -prune -exec rm -rf {} +
du -sh .gpu .carry/gpu-whl .carry/batchsrv/.pyx
touch .gpu/READY
