# Sourced by the bench/*_pass.sh device scripts: the package bundle unpacked once, the carried
# wheels installed (WHEELS, e.g. gemlite's), the offline environment and the carried tokenizers.
# Expects REPO (the repository copy holding .gpu/: site.tgz, smol_tok/, bert_tok/) and OUT.
mkdir -p "$OUT"
cd "$REPO"
if [ ! -d /tmp/s/site ]; then mkdir -p /tmp/s && tar xzf .gpu/site.tgz -C /tmp/s; fi
if [ -n "${WHEELS:-}" ] && [ ! -d /tmp/s/whl ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/s/whl "$WHEELS"/*.whl
fi
export PYTHONPATH="$REPO:/tmp/s/whl:/tmp/s/site" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAGTUNE_GPU_TOKENIZER="$REPO/.gpu/smol_tok" RAGTUNE_GPU_BERT_TOKENIZER="$REPO/.gpu/bert_tok"
