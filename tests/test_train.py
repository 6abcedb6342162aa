"""Training on the tiny model: LoRA changes only the adapter, loss falls, masks, saving, loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ragtune.config import compose, validate
from ragtune.schema import PromptFields, get_schema

SCHEMA = get_schema("alpaca_rag")
TOP = {"seed": int, "output_dir": str}


def make_examples(tokenizer, n: int = 8) -> list[dict]:
    """Short RAG examples, rendered through the one schema (completion ends with EOS)."""
    colours = ["blue", "green", "red", "amber"]
    out = []
    for i in range(n):
        c = colours[i % len(colours)]
        prompt, completion = SCHEMA.render_example(
            PromptFields(f"What colour is the zorb {i}?", "", [f"The zorb {i} is {c}."]),
            c.capitalize() + ".",
            tokenizer,
        )
        out.append({"prompt": prompt, "completion": completion, "kind": "oracle"})
    return out


def make_cfg(out: Path, model: str, *extra: str):
    cfg = compose(
        "sft",
        [
            f"output_dir={out}",
            f"model.name_or_path={model}",
            "model.max_seq_length=256",
            "train.max_steps=4",
            "train.per_device_train_batch_size=2",
            "train.logging_steps=1",
            "train.save_steps=2",
            "train.learning_rate=1e-2",
            "train.warmup_steps=0",
            "train.lr_scheduler_type=constant",
            *extra,
        ],
    )
    return validate(cfg, top_level=TOP)


@pytest.fixture(scope="module")
def tiny_tok(tiny_lm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_path)


@pytest.fixture(scope="module")
def examples(tiny_tok):
    return make_examples(tiny_tok)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_lm_path, examples):
    from ragtune.training.recipe import train

    out = tmp_path_factory.mktemp("lora-run")
    cfg = make_cfg(out, tiny_lm_path, "train.save_method=lora")
    return train(cfg, examples, SCHEMA, out, eval_examples=examples[:2])


# --------------------------------------------------------------------------- backend
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_backend_selection_on_cpu():
    from ragtune.training import TrainError
    from ragtune.training.backends import select_backend

    assert select_backend("auto") == "hf"
    assert select_backend("hf") == "hf"
    with pytest.raises(TrainError, match="CUDA"):
        select_backend("unsloth")


@pytest.mark.parametrize(
    ("cuda", "unsloth", "auto", "unsloth_asked"),
    [
        (True, True, "unsloth", "unsloth"),
        (True, False, "hf", "does not import"),
        (False, True, "hf", "needs a CUDA GPU"),
    ],
)
def test_backend_selection_follows_cuda_and_unsloth(
    monkeypatch, cuda, unsloth, auto, unsloth_asked
):
    import ragtune.training.backends as backends
    from ragtune.training import TrainError

    monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: unsloth)
    assert backends.select_backend("auto") == auto
    assert backends.select_backend("hf") == "hf"
    if unsloth_asked == "unsloth":
        assert backends.select_backend("unsloth") == "unsloth"
    else:
        with pytest.raises(TrainError, match=unsloth_asked):
            backends.select_backend("unsloth")
    with pytest.raises(TrainError, match="must be auto, hf or unsloth"):
        backends.select_backend("Unsloth")


def test_gradient_checkpointing_flag_and_lora_settings_pass_through():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ragtune.training.backends import lora_config, unsloth_gc

    assert unsloth_gc("unsloth") == "unsloth"  # Unsloth's offloaded checkpointing
    assert [unsloth_gc(v) for v in (True, "true", 1, False, "false", "False", "0", 0, None)] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        False,
    ]
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    for node in (lora, OmegaConf.create(lora)):  # a plain dict or the composed config
        got = lora_config(SimpleNamespace(lora=node))
        assert (got.r, got.lora_alpha, got.target_modules) == (4, 8, {"q_proj"})
        assert got.bias == "none" and got.task_type == "CAUSAL_LM"


def test_auto_dtype_is_bf16_on_a_bf16_gpu_fp16_on_an_older_one_and_fp32_on_cpu(monkeypatch):
    from ragtune.training.backends import _torch_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _torch_dtype("auto", cuda=True) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _torch_dtype("auto", cuda=True) is torch.float16
    assert _torch_dtype("auto", cuda=False) is torch.float32
    assert _torch_dtype("float16", cuda=False) is torch.float16


@pytest.mark.parametrize(
    ("dtype", "cuda", "load_in_4bit", "weights", "precision"),
    [
        ("bfloat16", True, False, torch.bfloat16, {"bf16": True, "fp16": False}),
        ("float16", True, False, torch.float16, {"bf16": False, "fp16": True}),
        ("float32", True, False, torch.float32, {"bf16": False, "fp16": False}),
        # 4-bit needs CUDA: on CPU the model loads unquantized, float32 master weights
        ("bfloat16", False, True, torch.float32, {"bf16": True, "fp16": False}),
        ("float32", False, True, torch.float32, {"bf16": False, "fp16": False}),
    ],
)
def test_hf_loading_sets_the_weights_dtype_and_the_trainers_precision(
    tmp_path, tiny_lm_path, dtype, cuda, load_in_4bit, weights, precision
):
    """``cuda=True`` without 4-bit only picks dtypes and precision flags (nothing moves to a
    GPU), so the GPU's choices are checked on this CPU."""
    from ragtune.training.backends import _load_hf

    cfg = make_cfg(
        tmp_path, tiny_lm_path, f"model.dtype={dtype}", f"model.load_in_4bit={load_in_4bit}"
    )
    model, tokenizer, got = _load_hf(cfg, tiny_lm_path, cuda)
    assert got == precision
    assert model.get_base_model().dtype == weights
    assert not getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_loading_warns_about_emulated_bf16_and_unquantized_4bit(
    tmp_path, tiny_lm_path, monkeypatch, caplog, native_bf16
):
    import ragtune.training.backends as backends

    monkeypatch.setattr(backends, "_cpu_has_bf16", lambda: native_bf16)
    cfg = make_cfg(tmp_path, tiny_lm_path, "model.dtype=bfloat16", "model.load_in_4bit=true")
    with caplog.at_level("WARNING", logger="ragtune.training.backends"):
        backends._load_hf(cfg, tiny_lm_path, cuda=False)
    said = caplog.text
    assert "loading unquantized on CPU" in said
    assert ("bf16 matmuls are emulated" in said) is not native_bf16


class _FakeFastLanguageModel:
    """Unsloth's loader as seen by ragtune (CUDA only): records what it is asked for."""

    calls: dict = {}
    embed_dtype = torch.bfloat16

    @classmethod
    def from_pretrained(cls, **kw):
        cls.calls["load"] = kw
        model = torch.nn.Module()
        model.embed = torch.nn.Embedding(2, 2).to(cls.embed_dtype)
        model.get_input_embeddings = lambda: model.embed
        return model, "tokenizer"

    @classmethod
    def get_peft_model(cls, model, **kw):
        cls.calls["peft"] = kw
        return model


@pytest.mark.parametrize(
    ("dtype", "embed", "bf16_gpu", "precision"),
    [
        ("auto", torch.bfloat16, True, {"bf16": True, "fp16": False}),
        ("auto", torch.float16, False, {"bf16": False, "fp16": True}),
        ("auto", torch.float32, True, {"bf16": True, "fp16": False}),  # autocast to bf16
        ("float32", torch.float32, True, {"bf16": False, "fp16": False}),  # asked for fp32
    ],
)
def test_unsloth_loading_expands_all_linear_and_reads_precision_from_the_weights(
    tmp_path, tiny_lm_path, monkeypatch, dtype, embed, bf16_gpu, precision
):
    import sys
    import types

    import ragtune.training.backends as backends

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = _FakeFastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setattr(_FakeFastLanguageModel, "calls", {})
    monkeypatch.setattr(_FakeFastLanguageModel, "embed_dtype", embed)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    cfg = make_cfg(
        tmp_path,
        tiny_lm_path,
        f"model.dtype={dtype}",
        "train.lora.target_modules=all-linear",
        "train.gradient_checkpointing=unsloth",
    )
    _, tokenizer, got = backends._load_unsloth(cfg, tiny_lm_path)
    assert got == precision and tokenizer == "tokenizer"
    calls = _FakeFastLanguageModel.calls
    assert calls["load"]["dtype"] is (None if dtype == "auto" else torch.float32)
    assert calls["load"]["use_gradient_checkpointing"] == "unsloth"
    assert calls["peft"]["target_modules"] == backends.LLAMA_LINEAR
    assert calls["peft"]["r"] == cfg.train.lora.r and calls["peft"]["bias"] == "none"
    cfg.train.lora.target_modules = ["q_proj", "v_proj"]
    backends._load_unsloth(cfg, tiny_lm_path)
    assert sorted(_FakeFastLanguageModel.calls["peft"]["target_modules"]) == ["q_proj", "v_proj"]


def test_a_prequantized_base_cannot_be_merged_in_16_bits_by_the_hf_backend(
    tmp_path, tiny_lm_path, examples, monkeypatch
):
    """A 4-bit checkpoint (e.g. unsloth/...-bnb-4bit) has no 16-bit weights for the hf
    backend to merge the LoRA into: refused before any model loads, naming the way out."""
    import ragtune.training.backends as backends
    from ragtune.training import TrainError
    from ragtune.training.backends import is_prequantized
    from ragtune.training.recipe import _check_save_method, train

    loads = []
    monkeypatch.setattr(backends, "load", lambda *a: loads.append(a))  # the model's path is
    # resolved first (the check reads its config), but the model itself must not load

    q4 = tmp_path / "base-bnb-4bit"
    q4.mkdir()
    config = json.loads((Path(tiny_lm_path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q4 / "config.json").write_text(json.dumps(config))
    assert is_prequantized(str(q4)) and not is_prequantized(tiny_lm_path)
    assert not is_prequantized(str(tmp_path / "missing"))  # the load itself reports that

    cfg = make_cfg(tmp_path, str(q4), "train.save_method=merged_16bit", "train.backend=hf")
    with pytest.raises(TrainError, match="pre-quantized .*train.save_method=lora"):
        train(cfg, examples, SCHEMA, tmp_path)
    assert loads == []
    for ok in (("lora", "hf"), ("merged_16bit", "unsloth")):  # these need no 16-bit weights here
        cfg.train.save_method = ok[0]
        _check_save_method(cfg, ok[1], str(q4))
    cfg.train.save_method = "merged_16bit"
    _check_save_method(cfg, "hf", tiny_lm_path)  # a 16-bit base merges


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_merged_4bit_on_cpu_is_refused_before_loading(
    tmp_path, tiny_lm_path, examples, no_model_loads
):
    from ragtune.training import TrainError
    from ragtune.training.recipe import train

    cfg = make_cfg(tmp_path, tiny_lm_path, "train.save_method=merged_4bit")
    with pytest.raises(TrainError, match="merged_4bit"):
        train(cfg, examples, SCHEMA, tmp_path)
    assert no_model_loads == []


# --------------------------------------------------------------------------- tokenization
def test_completion_mask_covers_exactly_the_completion(tiny_tok, examples):
    from ragtune.training.data import tokenize_examples

    ds, stats = tokenize_examples(examples, tiny_tok, SCHEMA, 256)
    assert stats["examples"] == len(examples) and stats["truncated"] == 0
    for ex, row in zip(examples, ds, strict=True):
        p_ids = SCHEMA.encode_prompt(tiny_tok, ex["prompt"])
        ids, mask = row["input_ids"], row["completion_mask"]
        assert len(ids) == len(mask)
        assert ids[: len(p_ids)] == p_ids
        assert mask == [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))
        assert ids[-1] == tiny_tok.eos_token_id
        assert ids.count(tiny_tok.eos_token_id) == 1  # EOS not doubled
        assert tiny_tok.decode(ids[len(p_ids) :]) == ex["completion"]


def test_completion_without_eos_text_gets_eos_and_long_examples_are_dropped(tiny_tok, examples):
    from ragtune.training import TrainError
    from ragtune.training.data import tokenize_examples

    bare = [{"prompt": examples[0]["prompt"], "completion": "Blue."}]
    ds, _ = tokenize_examples(bare, tiny_tok, SCHEMA, 256)
    assert ds[0]["input_ids"][-1] == tiny_tok.eos_token_id
    long = {"prompt": examples[0]["prompt"] * 5, "completion": examples[0]["completion"]}
    ds, stats = tokenize_examples([long, *examples[:2]], tiny_tok, SCHEMA, 256)
    assert stats["truncated"] == 1 and len(ds) == 2
    with pytest.raises(TrainError, match="max_seq_length"):
        tokenize_examples([long], tiny_tok, SCHEMA, 256)


def test_labels_the_trainer_builds_mask_the_prompt(tiny_tok, examples, tmp_path, tiny_lm_path):
    """What TRL actually trains on: labels are -100 on every prompt token."""
    from transformers import AutoModelForCausalLM

    from ragtune.training.data import tokenize_examples
    from ragtune.training.trainer import sft_config as _sft_config
    from ragtune.training.trainer import trainer_class as _trainer_class

    cfg = make_cfg(tmp_path, tiny_lm_path)
    ds, _ = tokenize_examples(examples[:2], tiny_tok, SCHEMA, 256)
    args = _sft_config(cfg, tmp_path / "ck", {"bf16": False, "fp16": False}, False)
    trainer = _trainer_class()(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_path),
        args=args,
        train_dataset=ds,
        processing_class=tiny_tok,
    )
    for ex, row in zip(examples[:2], trainer.train_dataset, strict=True):
        n_prompt = len(SCHEMA.encode_prompt(tiny_tok, ex["prompt"]))
        labels = row["labels"]
        assert all(lbl == -100 for lbl in labels[:n_prompt])
        assert labels[n_prompt:] == row["input_ids"][n_prompt:]


# --------------------------------------------------------------------------- training
def test_lora_trains_adapter_only_and_loss_decreases(lora_run, tiny_lm_path):
    from safetensors.torch import load_file

    r = lora_run
    assert r.backend == "hf" and r.steps == 4 and len(r.losses) == 4
    assert r.final_loss == r.losses[-1] < r.losses[0]
    assert r.tokens_per_second > 0 and r.peak_memory_gb is None
    assert r.eval_loss is not None and 0 < r.eval_loss < r.losses[0]  # held-out loss after training
    adapter = load_file(r.model_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # nothing but LoRA weights saved
    # lora_B starts at zero: training moved it
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (r.model_dir / "prompt_schema.json").exists()
    assert (r.model_dir / "tokenizer.json").exists()
    assert not (r.model_dir / "manifest.json").exists()  # the caller writes it last
    assert list((r.model_dir.parent / "tensorboard").glob("events.out.tfevents.*"))


def test_lora_folder_reloads_and_generates(lora_run, tiny_lm_path):
    from transformers import AutoModelForCausalLM

    from ragtune.loading import load_model

    model, tok = load_model(str(lora_run.model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    # the adapter was merged into its base on load: weights differ from the base's
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    ids = tok("### Instruction:\nhi", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_merged_model_changes_only_lora_targets_and_reloads(tmp_path, tiny_lm_path, examples):
    from transformers import AutoModelForCausalLM

    from ragtune.loading import load_model
    from ragtune.training.recipe import train

    r = train(
        make_cfg(tmp_path, tiny_lm_path, "train.save_method=merged_16bit"),
        examples,
        SCHEMA,
        tmp_path,
    )
    from safetensors.torch import load_file

    assert not (r.model_dir / "adapter_config.json").exists()
    assert list(r.model_dir.glob("*.safetensors")) and not list(r.model_dir.glob("*.bin"))
    saved = load_file(next(r.model_dir.glob("*.safetensors")))
    assert {w.dtype for w in saved.values()} == {torch.bfloat16}  # 16-bit, from a float32 base
    merged, tok = load_model(str(r.model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path).state_dict()
    got = merged.state_dict()
    assert set(got) == set(base)
    for name, w in base.items():
        w16 = w.to(torch.bfloat16).to(got[name].dtype)
        if name.endswith("proj.weight"):  # all-linear LoRA targets: merged delta
            assert not torch.equal(got[name], w16), name
        else:  # embeddings, norms: frozen
            assert torch.equal(got[name], w16), name
    ids = tok("### Instruction:\nhi", return_tensors="pt").input_ids
    assert merged.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


_KILLED_MERGE = """
import sys, time
from pathlib import Path
import ragtune.training.saving as saving
def slow_merge(model, tokenizer, out, save_method, **kw):
    (out / "model.safetensors").write_bytes(b"half a merge")
    print("ready", flush=True)
    time.sleep(600)
saving.save_hf = slow_merge
saving.save_model(None, None, None, Path(sys.argv[1]), save_method="merged_16bit",
                  backend="hf", base_model="base", base_path="base")
"""


def test_sigkilled_merge_keeps_the_previous_model_and_hides_the_partial_one(tmp_path):
    from conftest import sigkill_when_ready

    from ragtune.modelcard import TRAIN_INFO

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / TRAIN_INFO).write_text('{"previous": true}')
    sigkill_when_ready(_KILLED_MERGE, str(model_dir))
    assert [p.name for p in model_dir.iterdir()] == [TRAIN_INFO]  # the previous model, intact
    hidden = [p for p in tmp_path.iterdir() if p != model_dir]
    assert [h.name for h in hidden] == [".new-model"]  # staged: no manifest, never served
    assert (hidden[0] / "model.safetensors").read_bytes() == b"half a merge"


def test_crashed_merge_leaves_no_complete_looking_folder(
    tmp_path, tiny_lm_path, examples, monkeypatch
):
    import ragtune.training.saving as saving
    from ragtune.training.recipe import train

    def crash(model, tokenizer, out, save_method, **kw):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-merge")

    monkeypatch.setattr(saving, "save_hf", crash)
    with pytest.raises(RuntimeError, match="mid-merge"):
        train(make_cfg(tmp_path, tiny_lm_path, "train.max_steps=1"), examples, SCHEMA, tmp_path)
    assert not (tmp_path / "model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_load_model_errors_name_the_folder(tmp_path):
    from ragtune.loading import LoadError, load_model

    with pytest.raises(LoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "/no/such/base"}')
    with pytest.raises(LoadError, match="base model"):
        load_model(str(tmp_path))


def test_a_peft_adapter_without_ragtune_train_json_loads_the_base_its_adapter_config_names(
    lora_run, tmp_path
):
    """An adapter saved by PEFT alone (no ragtune_train.json, no manifest) names its base only
    in adapter_config.json; that base is loaded and the adapter merged into it."""
    import shutil

    from ragtune.loading import load_model
    from ragtune.modelcard import TRAIN_INFO

    folder = tmp_path / "peft-adapter"
    shutil.copytree(lora_run.model_dir, folder)
    (folder / TRAIN_INFO).unlink()
    assert not (folder / "manifest.json").exists()
    model, _ = load_model(str(folder))
    trained, _ = load_model(str(lora_run.model_dir))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[name], trained.state_dict()[name])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_asked_for_without_a_gpu_is_refused_before_any_model_loads(
    tiny_lm_path, no_model_loads
):
    from ragtune.loading import LoadError, load_model

    for device in ("cuda", "cuda:1"):
        with pytest.raises(LoadError, match=f"device='{device}' was asked for but no CUDA GPU"):
            load_model(tiny_lm_path, device=device)
    assert no_model_loads == []


def _copy_model(src: str, dest: Path, **save) -> Path:
    """A model folder saved from ``src``; ``save`` sets the weights' dtype or drops the
    tokenizer's pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=save.get("dtype", torch.float32))
    model.save_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(src)
    if save.get("no_pad"):
        tok.pad_token = None
    tok.save_pretrained(dest)
    return dest


def test_weights_load_as_float32_on_cpu_unless_a_dtype_is_asked_for(tiny_lm_path, tmp_path):
    """dtype=auto on CPU is float32 whatever the folder holds (merged_16bit saves bfloat16:
    emulated on CPU); a named dtype is the weights' dtype."""
    from ragtune.loading import LoadError, load_model

    folder = _copy_model(tiny_lm_path, tmp_path / "bf16", dtype=torch.bfloat16)
    for dtype, want in [
        ("auto", torch.float32),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ]:
        model, _ = load_model(str(folder), device="cpu", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {want}, dtype
    with pytest.raises(LoadError, match="dtype must be auto, float32, bfloat16 or float16"):
        load_model(str(folder), device="cpu", dtype="float64")


def test_a_damaged_model_folder_is_one_line_naming_it(tiny_lm_path, tmp_path):
    from ragtune.loading import LoadError, load_model

    folder = _copy_model(tiny_lm_path, tmp_path / "damaged")
    (folder / "model.safetensors").write_bytes(b"half a model")
    with pytest.raises(LoadError) as e:
        load_model(str(folder), device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"cannot load a model from {folder}: ") and "\n" not in msg
    # the library's error: its type and its first line
    assert re.search(r": \w+(Error|Exception): \S", msg), msg


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token(tiny_lm_path, tmp_path):
    from transformers import AutoTokenizer

    from ragtune.loading import load_model

    folder = _copy_model(tiny_lm_path, tmp_path / "no-pad", no_pad=True)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    _, tok = load_model(str(folder), device="cpu")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_completion_only_head_gives_the_full_models_loss(tiny_lm_path):
    """The CPU loss path scores only completion positions, yet equals the model's own loss."""
    from transformers import AutoModelForCausalLM

    from ragtune.training.padding import completion_only_head

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 40))
    labels = torch.full_like(ids, -100)
    labels[0, 30:38], labels[1, 20:25], labels[2, 35:] = ids[0, 30:38], ids[1, 20:25], ids[2, 35:]
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    n = (labels != -100).sum()
    full = model(**inputs, num_items_in_batch=n)
    head = completion_only_head(inputs)
    part = model(**head, num_items_in_batch=n)
    assert part.logits.shape[1] == len(head["logits_to_keep"]) < ids.shape[1] // 2
    assert part.loss.item() == pytest.approx(full.loss.item(), abs=1e-5)
    grads = []
    for out in (full, part):
        model.zero_grad()
        out.loss.backward()
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --------------------------------------------------------------------------- GPU (run on the device)
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("backend", "save_method"),
    [("unsloth", "merged_16bit"), ("unsloth", "lora"), ("hf", "merged_16bit"), ("hf", "lora")],
)
def test_gpu_backends_train_4bit_save_and_reload(
    tmp_path, lm_path, tokenizer, backend, save_method
):
    """4-bit QLoRA on SmolLM2-135M with each backend; the saved folder reloads and generates."""
    from ragtune.loading import load_model
    from ragtune.training.recipe import train

    if backend == "unsloth":
        pytest.importorskip("unsloth")
    cfg = make_cfg(
        tmp_path,
        lm_path,
        f"train.backend={backend}",
        f"train.save_method={save_method}",
        "model.load_in_4bit=true",
        "model.dtype=auto",
        "train.max_steps=6",
        "train.learning_rate=2e-3",
        "train.gradient_checkpointing=unsloth" if backend == "unsloth" else "train.packing=false",
    )
    r = train(cfg, make_examples(tokenizer, n=16), SCHEMA, tmp_path)
    assert r.backend == backend and r.steps == 6
    assert r.final_loss < r.losses[0]
    assert r.peak_memory_gb is not None and r.peak_memory_gb > 0
    assert list(r.model_dir.glob("*.safetensors")) and not list(r.model_dir.glob("*.bin"))
    assert (r.model_dir / "adapter_config.json").exists() == (save_method == "lora")
    model, tok = load_model(str(r.model_dir))
    prompt = make_examples(tok, n=1)[0]["prompt"]
    ids = torch.tensor([SCHEMA.encode_prompt(tok, prompt)], device=model.device)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_an_example_of_exactly_max_seq_length_trains_and_only_completions_count_as_such(
    tiny_tok, examples
):
    from ragtune.training.data import tokenize_examples

    ds, stats = tokenize_examples(examples, tiny_tok, SCHEMA, 256)
    longest = max(len(r) for r in ds["input_ids"])
    _, at = tokenize_examples(examples, tiny_tok, SCHEMA, longest)
    assert at["examples"] == len(examples) and at["truncated"] == 0
    assert stats["completion_tokens"] == sum(sum(m) for m in ds["completion_mask"])
    assert stats["completion_tokens"] < stats["tokens"]


def test_the_training_qa_file_is_named_when_unset_or_missing(tmp_path):
    from ragtune.errors import RagtuneError
    from ragtune.training.data import _qa_train_path

    with pytest.raises(RagtuneError, match="data.qa_train is not set: generate one"):
        _qa_train_path("")
    with pytest.raises(RagtuneError, match=f"data.qa_train: {tmp_path} not found"):
        _qa_train_path(str(tmp_path))  # a folder is not a QA file


def test_a_closed_book_dataset_takes_max_records_and_opens_no_index(
    tmp_path, tiny_lm_path, monkeypatch
):
    """raft.mode=closed builds from the first data.max_records records without a retriever;
    the preview shows raft.num_preview examples; an empty QA file is one clear error."""
    import json

    from ragtune.errors import RagtuneError
    from ragtune.training import data

    monkeypatch.setattr(data, "open_retriever", lambda *a, **k: pytest.fail("opened an index"))
    qa = tmp_path / "qa.jsonl"
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}" if i else ""} for i in range(5)]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(
        tmp_path / "run",
        tiny_lm_path,
        f"data.qa_train={qa}",
        "data.max_records=3",
        "raft.mode=closed",
        "raft.num_preview=1",
    )
    examples, stats, _tok, retriever = data.build_dataset(cfg, tmp_path / "run")
    assert retriever is None and [e["instruction"] for e in examples] == ["Q0?", "Q1?", "Q2?"]
    assert {e["kind"] for e in examples} == {"unanswerable", "closed"}  # two kinds to show
    assert (tmp_path / "run/dataset/preview.md").read_text().count("### Response:") == 1
    qa.write_text("\n")
    with pytest.raises(RagtuneError, match="no QA records"):
        data.build_dataset(cfg, tmp_path / "run")


def test_training_sequences_need_an_eos_and_examples_need_both_halves(tiny_tok):
    from types import SimpleNamespace

    from ragtune.training import TrainError
    from ragtune.training.data import encode_completion, tokenize_examples

    no_eos = SimpleNamespace(eos_token_id=None)
    with pytest.raises(TrainError, match="no EOS token id"):
        encode_completion(no_eos, "Blue.")
    with pytest.raises(TrainError, match=r"example 0 lacks 'prompt' or 'completion'.*\['prompt'\]"):
        tokenize_examples([{"prompt": "Q"}], tiny_tok, SCHEMA, 256)


def test_a_single_process_builds_its_own_dataset_and_keeps_its_retriever(
    tmp_path, monkeypatch, tiny_lm_path, tiny_tok
):
    """Without torchrun the dataset is built here and the retriever comes back with it (the
    calibration after training answers through it); opening the retriever without ingesting
    leaves the index alone."""
    from ragtune import ingest, retriever
    from ragtune.training import data

    built = ([{"prompt": "p", "completion": "c"}], {"examples": 1}, "tok", "the retriever")
    monkeypatch.setattr(data, "init_distributed", lambda: False)
    monkeypatch.setattr(data, "build_dataset", lambda cfg, out: built)
    assert data.shared_dataset(None, tmp_path) == (built[0], built[1], built[3], tmp_path)

    monkeypatch.setattr(ingest, "ingest_corpus", lambda *a, **k: pytest.fail("ingested"))
    monkeypatch.setattr(retriever.Retriever, "from_config", classmethod(lambda cls, *a, **k: "R"))
    cfg = make_cfg(tmp_path / "run", tiny_lm_path)
    assert data.open_retriever(cfg, tiny_tok, ingest_corpus=False) == "R"
