"""Every config and preset composes; bad configs fail early with one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ragtune.config import ConfigError, compose, validate
from ragtune.paths import CONF_DIR, PROJECT_ROOT

ENTRY_POINTS = {
    "sft": {"seed": int, "output_dir": str},
    "index": {},
    "ask": {},
    "eval": {"seed": int, "output_dir": str},
    "gen_qa": {"seed": int, "output_dir": str, "gen_qa": dict},
    "embed_ft": {"seed": int, "output_dir": str, "embed_ft": dict},
}
PRESETS = sorted(p.stem for p in (CONF_DIR / "conf").glob("*.yaml"))
GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml"))
    for g in CONF_DIR.iterdir()
    if g.is_dir() and g.name not in ("conf", "hydra")
}


def _top_level(name):
    keys = dict(ENTRY_POINTS.get(name, {}))
    keys.update({"model_dir": str, "question": str, "json": bool, "allow_mismatch": bool})
    return keys


def _validate(name, overrides=()):
    return validate(
        compose(
            name,
            [
                *overrides,
                *(["output_dir=/tmp/x"] if name in ("sft", "eval", "gen_qa", "embed_ft") else []),
            ],
        ),
        _top_level(name),
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_every_entry_config_and_preset_composes(name, preset):
    cfg = _validate(name, [f"conf={preset}"] if preset else [])
    assert cfg.paths.root == str(PROJECT_ROOT)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    name = "sft" if group != "generate" else "ask"
    cfg = _validate(name, [f"{group}={option}"])
    assert group in cfg


def test_every_config_file_starts_with_a_comment_naming_a_command():
    for path in CONF_DIR.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        if first.startswith("# @package"):
            first = path.read_text().splitlines()[1]
        assert first.startswith("# ") and "python " in path.read_text().split("\n\n")[0], path


def test_nemo_preset_selects_the_seed_gpu_setup():
    cfg = _validate("sft", ["conf=nemo_rag"])
    assert cfg.model.name_or_path == "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit"
    assert cfg.model.load_in_4bit and cfg.train.backend == "unsloth"
    assert cfg.train.lora.r == 16 and len(cfg.train.lora.target_modules) == 7
    assert cfg.retriever.embedding_model == "BAAI/bge-base-en" and cfg.retriever.normalize
    assert (cfg.retriever.chunk_size, cfg.retriever.chunk_overlap, cfg.retriever.k) == (
        2000,
        120,
        3,
    )


def test_qwen_preset_selects_the_measured_gpu_recipe():
    cfg = _validate("sft", ["conf=qwen_rag"])
    assert cfg.model.name_or_path == "qwen2.5-coder-1.5b" and cfg.model.dtype == "bfloat16"
    assert cfg.raft.contrastive and cfg.raft.unanswerable_on_topic
    assert cfg.raft.oracle_fraction == 1.0 and cfg.raft.unanswerable_fraction is None
    assert cfg.train.per_device_train_batch_size == 8
    # half the train group's rate: at 5e-4 the 1.5B LoRA's steps spiked and seed 0 diverged
    assert cfg.train.learning_rate == 2.5e-4 and _validate("sft").train.learning_rate == 5e-4
    assert cfg.retriever.hybrid and not _validate("sft").retriever.hybrid
    # counterfactual questions and the preference step on them (session 21's measured recipe)
    assert cfg.raft.swapped_twin and cfg.train.preference.num_train_epochs == 1
    assert not _validate("sft", ["raft=contrast"]).raft.swapped_twin
    # the two-feature decision, every model's default since session 25 (it separated better than
    # the six on every run of this recipe and of SmolLM2's CPU benchmark); the six can be named
    assert list(cfg.raft.calibration_features) == ["abstain_logodds", "retrieval"]
    assert list(_validate("sft").raft.calibration_features) == ["abstain_logodds", "retrieval"]
    six = "raft.calibration_features=[margin,mean_lp,lp_abstain,p_abstain_first,grounded,retrieval]"
    assert len(_validate("sft", [six]).raft.calibration_features) == 6
    # serving composes the same model and retriever settings, so the trained folder's manifest matches
    ask = _validate("ask", ["conf=qwen_rag"])
    assert ask.model.dtype == "bfloat16" and ask.retriever.hybrid
    # a GPU decodes 32 questions at once, in the calibration pass and in train/eval.py alike
    assert cfg.eval.batch_size == 32 == _validate("eval", ["conf=qwen_rag"]).eval.batch_size
    assert _validate("eval").eval.batch_size == 8


def test_the_contrast_construction_is_a_raft_option_of_its_own():
    cfg = _validate("sft", ["raft=contrast"])
    assert cfg.raft.contrastive and cfg.raft.unanswerable_on_topic
    assert cfg.model.name_or_path == "smollm2-135m-instruct"  # any model can use it
    assert not _validate("sft").raft.contrastive  # and the default stays off


def test_default_is_the_cpu_setup():
    cfg = _validate("sft")
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.retriever.embedding_model == "minilm-l6"
    assert cfg.train.backend == "auto"
    assert cfg.retriever.persist_dir.startswith(cfg.paths.outputs)


def test_outputs_root_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_OUTPUTS", str(tmp_path))
    cfg = _validate("sft")
    assert cfg.paths.outputs == str(tmp_path)
    assert cfg.retriever.persist_dir == str(tmp_path / "index")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("retriever.chunk_overlap=1000", "retriever.chunk_overlap"),
        ("retriever.k=0", "retriever.k"),
        ("retriever.k=three", "retriever.k"),
        ("retriever.reader_rerank=2", "retriever.reader_rerank"),  # not more than k (3)
        ("retriever.reader_rerank=-1", "retriever.reader_rerank"),
        ("retriever.ef_search=10", "retriever.ef_search"),  # fewer than fetch_k (20)
        ("+retriever.bogus=1", "retriever.bogus"),
        ("+bogus=1", "bogus"),
        ("model.name_or_path=./no/such/model", "model.name_or_path"),
        ("prompt.name=nope", "prompt.name"),
        ("train.backend=tpu", "train.backend"),
        ("train.save_method=gguf", "train.save_method"),
        ("raft.oracle_fraction=1.5", "raft.oracle_fraction"),
        ("raft.unanswerable_fraction=1.2", "raft.unanswerable_fraction"),
        ("train.lora.r=0", "train.lora.r"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size"),
        ("train.lora.lora_dropout=1.0", "train.lora.lora_dropout"),
        ("model.dtype=int3", "model.dtype"),
        ("train.divergence_factor=0.5", "train.divergence_factor"),
        ("train.divergence_restarts=-1", "train.divergence_restarts"),
        ("train.divergence_lr_scale=0", "train.divergence_lr_scale"),
        ("train.divergence_lr_scale=1.5", "train.divergence_lr_scale"),
        ("train.preference.undo_above=0", "train.preference.undo_above"),
        ("train.max_grad_norm=0", "train.max_grad_norm"),
        ("train.adam_beta2=1.0", "train.adam_beta2"),
        ("raft.calibration_features=[margin,retreival]", "raft.calibration_features"),
        ("raft.calibration_features=[]", "raft.calibration_features"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        _validate("sft", [override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("stage", "top_level", "override", "message"),
    [
        ("sft", "ragtune.training.recipe:SFT_TOP_LEVEL", "seed=soon", "seed: must be an integer"),
        ("sft", "ragtune.training.recipe:SFT_TOP_LEVEL", "seed=true", "seed: must be an integer"),
        ("eval", "ragtune.evaluate:EVAL_TOP_LEVEL", "output_dir=[a,b]", "output_dir: must be text"),
        ("ask", "ragtune.rag:ASK_TOP_LEVEL", "json=yes", "json: must be true or false"),
        (
            "gen_qa",
            "ragtune.qa_gen_stage:GEN_QA_TOP_LEVEL",
            "gen_qa=3",
            "gen_qa: must be a mapping",
        ),
    ],
)
def test_an_entry_points_own_key_of_the_wrong_type_is_named(stage, top_level, override, message):
    """Before a library meets it (``seed=soon`` reached the trainer's set_seed)."""
    import importlib

    module, name = top_level.split(":")
    with pytest.raises(ConfigError, match=message) as err:
        needs_dir = stage != "ask" and "output_dir" not in override
        overrides = [override, *(["output_dir=/tmp/x"] if needs_dir else [])]
        validate(compose(stage, overrides), getattr(importlib.import_module(module), name))
    assert "\n" not in str(err.value)


def test_a_question_hydra_reads_as_a_number_is_still_a_question():
    from ragtune.rag import ASK_TOP_LEVEL

    assert validate(compose("ask", ["question=2024"]), ASK_TOP_LEVEL).question == 2024


def test_entry_point_prints_the_composed_nemo_preset():
    out = subprocess.run(
        [sys.executable, "train/sft.py", "conf=nemo_rag", "--cfg", "job"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Mistral-Nemo-Instruct-2407-bnb-4bit" in out.stdout and "BAAI/bge-base-en" in out.stdout


def test_missing_preset_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "train/sft.py", "conf=nope", "--cfg", "job"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: conf=nope: no preset"), out.stderr
    assert "nemo_rag" in lines[0]  # and it names the presets there are


def test_defaults_live_in_the_yaml_and_the_dataclasses_read_them():
    """One source of defaults: conf/<group>/<option>.yaml; the Python API gets the same values."""
    from omegaconf import OmegaConf

    from ragtune.config import GenerateConfig, RetrieverConfig, TrainConfig

    cfg = _validate("sft")
    assert RetrieverConfig().chunk_size == cfg.retriever.chunk_size == 300
    assert TrainConfig().num_train_epochs == cfg.train.num_train_epochs == 2
    assert TrainConfig().lora.lora_alpha == cfg.train.lora.lora_alpha
    generate = OmegaConf.structured(GenerateConfig)
    assert OmegaConf.to_container(generate) == OmegaConf.to_container(cfg.generate)
    assert RetrieverConfig().persist_dir == ""  # an interpolation: resolved only when composed


# What a user may type for each choice key (docs and conf/ comments); a lost choice would reject
# a config that worked before.
CHOICES = {
    "train.backend": ["auto", "hf", "unsloth"],
    "train.save_method": ["lora", "merged_16bit", "merged_4bit"],
    "train.preference.loss_type": ["simpo", "sigmoid", "hinge", "ipo"],
    "train.train_sampling_strategy": ["random", "group_by_length"],
    "model.dtype": ["auto", "float32", "bfloat16", "float16"],
    "raft.mode": ["rag", "closed"],
    "raft.calibration_extremes": ["apply", "ignore"],
    "retriever.chunk_unit": ["chars", "tokens"],
}
FEATURES = [
    "margin",
    "mean_lp",
    "lp_abstain",
    "p_abstain_first",
    "abstain_logodds",
    "abstain_logodds_rotated",
    "grounded",
    "retrieval",
]


def test_every_choice_a_user_may_type_is_accepted():
    from omegaconf import OmegaConf

    for i in range(max(len(v) for v in CHOICES.values())):  # one config per column of choices
        picked = {key: values[i] for key, values in CHOICES.items() if i < len(values)}
        cfg = _validate("sft", [f"{key}={value}" for key, value in picked.items()])
        assert {key: OmegaConf.select(cfg, key) for key in picked} == picked
    cfg = _validate("sft", [f"raft.calibration_features=[{','.join(FEATURES)}]"])
    assert list(cfg.raft.calibration_features) == FEATURES


def test_a_bad_choice_lists_the_choices_on_one_line():
    with pytest.raises(ConfigError) as err:
        _validate("sft", ["train.backend=tpu"])
    assert str(err.value) == "train.backend: must be one of auto, hf, unsloth, got 'tpu'"


def test_train_keys_are_the_library_argument_names():
    """cfg.train feeds SFTConfig and cfg.train.lora feeds LoraConfig without renaming."""
    import inspect

    from peft import LoraConfig
    from trl import SFTConfig

    from ragtune.training.trainer import SFT_ARGS

    cfg = _validate("sft")
    sft_fields = set(inspect.signature(SFTConfig).parameters)
    assert set(SFT_ARGS) <= set(cfg.train) and set(SFT_ARGS) <= sft_fields
    assert set(cfg.train.lora) <= set(inspect.signature(LoraConfig).parameters)


def test_clipping_and_adam_beta2_reach_both_training_steps(tmp_path):
    """train.max_grad_norm and train.adam_beta2 (a sweep's levers against a spiking run) feed the
    SFT step's SFTConfig and the preference step's CPOConfig alike."""
    from ragtune.training.preference import cpo_config
    from ragtune.training.trainer import sft_config

    precision = {"bf16": False, "fp16": False}
    default = sft_config(_validate("sft"), tmp_path, precision, cuda=False)
    assert (default.max_grad_norm, default.adam_beta2) == (1.0, 0.999)
    cfg = _validate("sft", ["train.max_grad_norm=0.3", "train.adam_beta2=0.95"])
    for args in (
        sft_config(cfg, tmp_path, precision, cuda=False),
        cpo_config(cfg, tmp_path, precision, cuda=False),
    ):
        assert (args.max_grad_norm, args.adam_beta2) == (0.3, 0.95)


@pytest.mark.parametrize(
    ("setting", "backend", "extra", "expected"),
    [
        ("false", "hf", [], False),
        ("true", "hf", [], True),
        ("unsloth", "hf", [], True),
        ("true", "unsloth", [], False),
        ("true", "hf", ["train.fsdp=full_shard auto_wrap"], False),  # FSDP's own instead
    ],
)
def test_gradient_checkpointing_reaches_both_training_steps(
    tmp_path, setting, backend, extra, expected
):
    """train.gradient_checkpointing (what lets a 1.5B model's preference step fit a 24 GiB CPU:
    each pair is two sequences) turns the Trainer's checkpointing on for SFT and the preference
    step alike; Unsloth applied its own in get_peft_model, and FSDP checkpoints through its own
    wrapping, so their Trainer flag stays off."""
    from ragtune.training.preference import cpo_config
    from ragtune.training.trainer import sft_config

    precision = {"bf16": False, "fp16": False}
    cfg = _validate("sft", [f"train.gradient_checkpointing={setting}", *extra])
    sft = sft_config(cfg, tmp_path, precision, cuda=False, backend=backend)
    cpo = cpo_config(cfg, tmp_path, precision, cuda=False, backend=backend)
    assert sft.gradient_checkpointing is cpo.gradient_checkpointing is expected


def test_an_interpolation_that_cannot_resolve_is_one_line_naming_it():
    with pytest.raises(ConfigError) as err:
        _validate("sft", ["retriever.persist_dir=${no_such.key}"])
    assert str(err.value).startswith("retriever.persist_dir: ")  # the key that holds it
    assert "no_such.key" in str(err.value) and "\n" not in str(err.value)


def test_a_value_where_a_list_belongs_names_the_key():
    with pytest.raises(ConfigError) as err:
        _validate("sft", ["raft.calibration_features=margin"])
    msg = str(err.value)
    assert msg.startswith("raft.calibration_features: ") and "\n" not in msg


def test_a_validated_config_still_refuses_keys_it_does_not_have():
    """validate unlocks the config to put the typed groups in, then locks it again: code that
    writes a misspelt key fails instead of adding one."""
    from omegaconf.errors import ConfigAttributeError

    cfg = _validate("sft")
    with pytest.raises(ConfigAttributeError):
        cfg.retreiver = {"k": 3}
