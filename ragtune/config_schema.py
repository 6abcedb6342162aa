"""The config schema: typed dataclasses, choices as enums and value ranges for every group.

Every default lives in the YAML under conf/; these classes read theirs from it
(:func:`defaults_from`), so the Python API and the Hydra stages cannot disagree.
``ragtune.config`` checks a composed config against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import OmegaConf

from ragtune.paths import CONF_DIR


# --------------------------------------------------------------------------- schema
# Every default lives in the YAML under conf/ (the file named in @defaults_from); these classes
# hold types, choices (enums) and ranges, and read their defaults from that file, so the Python
# API (e.g. ``RetrieverConfig(persist_dir=...)``) and the Hydra stages cannot disagree.
def defaults_from(option: str) -> Callable[[type], type]:
    """Class decorator: field defaults from ``conf/<file>.yaml`` (``file:node`` for a sub-node).

    Interpolations (``${paths.outputs}/index``) only resolve in a composed config; outside one
    the default is ``None`` for optional fields and ``""`` otherwise.
    """
    path, _, node = option.partition(":")

    def apply(cls: type) -> type:
        data = OmegaConf.load(CONF_DIR / f"{path}.yaml")
        values = OmegaConf.to_container(data[node] if node else data, resolve=False)
        for name, hint in cls.__annotations__.items():
            if name not in values or hasattr(cls, name):
                continue
            value = values[name]
            if isinstance(value, str) and "${" in value:
                value = None if "None" in str(hint) else ""
            if isinstance(value, list | dict):
                value = field(default_factory=lambda v=value: type(v)(v))
            setattr(cls, name, value)
        return dataclass(cls)

    return apply


class Backend(StrEnum):
    auto = "auto"
    hf = "hf"
    unsloth = "unsloth"


class SaveMethod(StrEnum):
    lora = "lora"
    merged_16bit = "merged_16bit"
    merged_4bit = "merged_4bit"


class PreferenceLoss(StrEnum):  # CPOConfig.loss_type values
    simpo = "simpo"
    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"


class Sampling(StrEnum):
    random = "random"
    group_by_length = "group_by_length"


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class RaftMode(StrEnum):
    rag = "rag"  # retrieved contexts
    closed = "closed"  # no context (the closed-book baseline)


class CalibrationExtremes(StrEnum):
    apply = "apply"  # a fitted "abstain on (answer) every question" is the decision
    ignore = "ignore"  # no decision written then: the model answers as generated


class AnswerFeature(StrEnum):
    """What an answer-or-abstain mix may weigh: ragtune.answerability.CHOICES."""

    margin = "margin"
    mean_lp = "mean_lp"
    lp_abstain = "lp_abstain"
    p_abstain_first = "p_abstain_first"
    abstain_logodds = "abstain_logodds"
    abstain_logodds_rotated = "abstain_logodds_rotated"
    abstain_logodds_chunk = "abstain_logodds_chunk"
    grounded = "grounded"
    retrieval = "retrieval"


class ChunkUnit(StrEnum):
    chars = "chars"
    tokens = "tokens"


@defaults_from("paths/default")
class PathsConfig:
    root: str
    outputs: str


@defaults_from("model/smollm2")
class ModelConfig:
    name_or_path: str
    dtype: DType
    load_in_4bit: bool
    max_seq_length: int
    trust_remote_code: bool


@defaults_from("retriever/minilm")
class RetrieverConfig:
    embedding_model: str
    normalize: bool
    batch_size: int
    device: str
    chunk_size: int
    chunk_overlap: int
    chunk_unit: ChunkUnit
    k: int
    fetch_k: int
    reader_rerank: int
    ef_search: int
    dedup_cosine: float
    dedup_overlap: float
    hybrid: bool
    mmr: bool
    mmr_lambda: float
    context_tokens: int
    persist_dir: str
    collection: str | None
    server: str | None
    max_file_bytes: int


@defaults_from("prompt/alpaca_rag_short")
class PromptConfig:
    name: str


@defaults_from("data/demo")
class DataConfig:
    corpus: str
    qa_train: str | None  # empty / null: no QA file yet (train/gen_qa.py makes one)
    qa_eval: str
    jsonl_text_field: str
    max_records: int


@defaults_from("raft/default")
class RaftConfig:
    mode: RaftMode
    oracle_fraction: float
    abstain_without_oracle: bool
    unanswerable_fraction: float | None
    shuffle_oracle: bool
    num_preview: int
    contrastive: bool
    unanswerable_on_topic: bool
    ablated_twin: bool
    swapped_twin: bool
    max_unsupported_fraction: float
    calibration_fraction: float
    calibration_extremes: CalibrationExtremes
    calibration_features: list[AnswerFeature]


@defaults_from("train/cpu:lora")
class LoraConfig:
    """peft.LoraConfig's own argument names, passed through unchanged."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: Any  # "all-linear" or a list of module names


@defaults_from("train/cpu:preference")
class PreferenceConfig:
    """trl.experimental.cpo.CPOConfig's own argument names (ragtune.training.preference)
    plus ragtune's ``undo_above``."""

    num_train_epochs: float
    learning_rate: float
    loss_type: PreferenceLoss
    beta: float
    simpo_gamma: float
    cpo_alpha: float
    undo_above: float | None  # the step's loss rise (last / first quarter) that undoes it


@defaults_from("train/cpu")
class TrainConfig:
    """SFTConfig's own argument names (see ragtune.training.trainer.SFT_ARGS) plus ragtune's."""

    backend: Backend
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    warmup_steps: float
    lr_scheduler_type: str
    weight_decay: float
    optim: str  # a transformers OptimizerNames value, checked before the model loads
    max_grad_norm: float
    adam_beta2: float
    packing: bool
    padding_free: Any  # "auto", true or false
    train_sampling_strategy: Sampling
    gradient_checkpointing: Any  # bool or "unsloth"
    logging_steps: int
    report_to: Any  # a Trainer integration name or a list of them ("none" = none)
    save_steps: int
    save_total_limit: int
    divergence_factor: float | None  # stop and rewind when the loss jumps this many times
    divergence_restarts: int  # times a diverged run resumes from its checkpoint before the spike
    divergence_lr_scale: float  # the resumed run's learning rates, as a share of the checkpoint's
    resume: bool
    save_method: SaveMethod
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval_after: bool
    fsdp: str  # "" = DDP; else FSDP options, e.g. "full_shard auto_wrap" (FSDP_OPTIONS)


@defaults_from("generate/default")
class GenerateConfig:
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    stream: bool
    fast: bool
    engine_url: str | None
    engine_model: str | None


@defaults_from("server:server")
class ServerConfig:
    host: str
    port: int
    api_key: str | None
    max_body_bytes: int
    max_queue: int
    model_id: str | None
    log_level: str
    history_tokens: int
    keep_alive_s: int
    generation_only: bool
    batching: str
    max_batch: int
    batch_invariant: bool
    batch_weights: str


@defaults_from("eval/default:models")
class EvalModelsConfig:
    base: str | None
    ft_closed: str | None
    raft_rag: str | None


@defaults_from("eval/default")
class EvalConfig:
    modes: list[str] | None
    models: EvalModelsConfig = field(default_factory=EvalModelsConfig)
    batch_size: int
    max_questions: int
    ingest: bool
    corpus: str
    persist_dir: str
    device: str


EVAL_MODES = ("base_rag", "ft_closed", "ft_then_rag", "raft_rag")
BACKENDS = tuple(Backend)
SAVE_METHODS = tuple(SaveMethod)
SAMPLINGS = tuple(Sampling)
DTYPES = tuple(DType)
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")

# Which groups each top-level config may hold, and their schema. Keys not listed here are
# plain top-level values of the entry point (question, seed, ...), checked by the caller.
GROUP_SCHEMAS: dict[str, type] = {
    "paths": PathsConfig,
    "model": ModelConfig,
    "retriever": RetrieverConfig,
    "prompt": PromptConfig,
    "data": DataConfig,
    "raft": RaftConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
    "eval": EvalConfig,
    "server": ServerConfig,
}

# Ranges, one line each: key -> (lowest, highest, whether each end is included); None = open.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "retriever.chunk_size": (0, None, False, True),
    "retriever.k": (0, None, False, True),
    "retriever.batch_size": (0, None, False, True),
    "retriever.dedup_cosine": (0, 1, False, True),
    "retriever.dedup_overlap": (0, 1, False, True),
    "retriever.mmr_lambda": (0, 1, True, True),
    "retriever.max_file_bytes": (0, None, True, True),
    "retriever.context_tokens": (0, None, True, True),
    "model.max_seq_length": (64, None, True, True),
    "raft.oracle_fraction": (0, 1, True, True),
    "raft.unanswerable_fraction": (0, 1, True, True),
    "raft.max_unsupported_fraction": (0, 1, True, True),
    "raft.calibration_fraction": (0, 1, True, False),
    "train.lora.r": (0, None, False, True),
    "train.lora.lora_dropout": (0, 1, True, False),
    "train.learning_rate": (0, None, False, True),
    "train.max_grad_norm": (0, None, False, True),
    "train.adam_beta2": (0, 1, False, False),
    "train.per_device_train_batch_size": (0, None, False, True),
    "train.gradient_accumulation_steps": (0, None, False, True),
    "train.save_steps": (0, None, False, True),
    "train.divergence_factor": (1, None, False, True),
    "train.divergence_restarts": (0, None, True, True),
    "train.divergence_lr_scale": (0, 1, False, True),
    "train.preference.num_train_epochs": (0, None, True, True),
    "train.preference.learning_rate": (0, None, False, True),
    "train.preference.beta": (0, None, False, True),
    "train.preference.cpo_alpha": (0, None, True, True),
    "train.preference.undo_above": (0, None, False, True),
    "eval.batch_size": (0, None, False, True),
    "eval.max_questions": (0, None, True, True),
    "generate.max_new_tokens": (0, None, False, True),
    "generate.temperature": (0, None, True, True),
    "generate.top_p": (0, 1, False, True),
    "server.port": (0, 65535, True, True),
    "server.max_body_bytes": (0, None, False, True),
    "server.max_queue": (0, None, False, True),
    "server.max_batch": (0, None, False, True),
}
