"""Config schema and early validation for every Hydra entry point.

The YAML under conf/ holds every default; this module checks a composed config against typed
dataclasses (types, choices as enums, ranges) before any model loads, so a typo, a wrong type or
an impossible combination is a one-line error that names the key (``retriever.chunk_overlap``), never a traceback from inside a library.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ragtune.errors import RagtuneError
from ragtune.paths import CONF_DIR, current_project

log = logging.getLogger(__name__)

if not OmegaConf.has_resolver("ragtune_root"):
    OmegaConf.register_new_resolver("ragtune_root", lambda: str(current_project()))


class ConfigError(RagtuneError, ValueError):
    """A configuration a user can fix; the message names the key."""


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


# --------------------------------------------------------------------------- validation
def validate(cfg: DictConfig, top_level: dict[str, type] | None = None) -> DictConfig:
    """Check types, choices, unknown keys and value ranges; return the resolved config.

    ``top_level`` maps the entry point's own plain keys to their types (e.g. ``seed: int``).
    Raises :class:`ConfigError` naming the first offending key.
    """
    top_level = top_level or {}
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    for key in cfg:
        if key == "hydra":
            continue
        if key in GROUP_SCHEMAS:
            try:
                merged = OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[key]), cfg[key])
            except OmegaConfBaseException as e:
                raise ConfigError(_one_line(e, prefix=str(key))) from None
            with _writable(cfg):
                cfg[key] = merged
        elif key not in top_level:
            raise ConfigError(f"unknown config key '{key}'")
    for key, bounds in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            _check_range(key, value, *bounds)
    _check_combinations(cfg)
    return cfg


def _check_range(
    key: str, value: float, low: float | None, high: float | None, low_in: bool, high_in: bool
) -> None:
    ok = (low is None or value > low or (low_in and value == low)) and (
        high is None or value < high or (high_in and value == high)
    )
    if ok:
        return
    if high is None:
        raise ConfigError(f"{key}: must be {'>=' if low_in else '>'} {low}, got {value}")
    lo, hi = "[" if low_in else "(", "]" if high_in else ")"
    raise ConfigError(f"{key}: must be in {lo}{low}, {high}{hi}, got {value}")


def _check_combinations(cfg: DictConfig) -> None:
    """Rules across keys, and names that need a lookup (prompt, model)."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    if "retriever" in cfg:
        r = cfg.retriever
        need(
            0 <= r.chunk_overlap < r.chunk_size,
            "retriever.chunk_overlap",
            f"must be >= 0 and < retriever.chunk_size ({r.chunk_size}), got {r.chunk_overlap}",
        )
        need(
            r.fetch_k >= r.k,
            "retriever.fetch_k",
            f"must be >= retriever.k ({r.k}), got {r.fetch_k}",
        )
    if "raft" in cfg:
        need(
            len(cfg.raft.calibration_features) > 0,
            "raft.calibration_features",
            "name at least one feature, e.g. [abstain_logodds, retrieval]",
        )
    if "model" in cfg:
        need(bool(cfg.model.name_or_path), "model.name_or_path", "must name a model")
        _check_model_name(cfg.model.name_or_path)
    if "prompt" in cfg:
        from ragtune.schema import PromptError, get_schema

        try:
            get_schema(cfg.prompt.name)
        except PromptError as e:
            raise ConfigError(f"prompt.name: {e}") from None
    if "train" in cfg:
        t = cfg.train
        need(
            t.num_train_epochs > 0 or t.max_steps > 0,
            "train.num_train_epochs",
            "train.num_train_epochs or train.max_steps must be > 0",
        )
        need(
            t.padding_free in ("auto", True, False),
            "train.padding_free",
            f"must be auto, true or false, got {t.padding_free!r}",
        )
        need(
            not (t.packing and t.padding_free is False),
            "train.padding_free",
            "packed rows are always padding-free (TRL's best-fit packing); set "
            "train.packing=false to train on padded batches",
        )
        fsdp = str(t.get("fsdp") or "").split()
        bad = [o for o in fsdp if o not in FSDP_OPTIONS]
        need(
            not bad,
            "train.fsdp",
            f"unknown option(s) {bad}; use '' (DDP) or some of {', '.join(FSDP_OPTIONS)}",
        )
        need(
            not ("full_shard" in fsdp and "shard_grad_op" in fsdp),
            "train.fsdp",
            "full_shard and shard_grad_op are alternatives; choose one",
        )
        need(
            not fsdp or t.backend != "unsloth",
            "train.fsdp",
            "FSDP needs train.backend=hf (Unsloth trains on one GPU); set train.backend=hf",
        )
    if "eval" in cfg:
        for mode in cfg.eval.modes or []:
            need(
                mode in EVAL_MODES,
                "eval.modes",
                f"unknown mode {mode!r}; choose from {', '.join(EVAL_MODES)}",
            )
    if "server" in cfg:
        need(bool(cfg.server.host), "server.host", "must name an address, e.g. 127.0.0.1")
        batching = cfg.server.batching
        ok = str(batching).lower() in ("auto", "true", "false")
        need(ok, "server.batching", f"must be auto, true or false, got {batching!r}")
        weights = OmegaConf.select(cfg, "server.batch_weights", default="auto")
        ok = str(weights).lower() in ("auto", "fp8", "dense")
        need(ok, "server.batch_weights", f"must be auto, fp8 or dense, got {weights!r}")
    url = OmegaConf.select(cfg, "generate.engine_url")
    if url:
        need(
            str(url).startswith(("http://", "https://")),
            "generate.engine_url",
            f"must be an http(s) URL such as http://gpu-host:8000/v1, got {url!r}",
        )
        # evaluation and training load each model's own weights: an engine serves one model
        need("eval" not in cfg, "generate.engine_url", "is for ask and serve only; unset it")
        need(
            not OmegaConf.select(cfg, "server.generation_only"),
            "generate.engine_url",
            "a server with server.generation_only=true is an engine itself; unset one of them",
        )


def _check_model_name(name: str) -> None:
    """A local-looking model path must exist (checked before anything loads)."""
    from ragtune.models import EMBEDDED_LMS, ModelNotFoundError, _resolve_other

    if name in EMBEDDED_LMS:  # its package is checked when it loads (one line: how to install)
        return
    try:
        _resolve_other(name, "model")
    except ModelNotFoundError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None


def _one_line(e: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(e, "full_key", None) or ""
    if prefix and key and not key.startswith(f"{prefix}."):
        key = f"{prefix}.{key}"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key or prefix}'"
    if msg.startswith("Invalid value") and "expected one of" in msg:  # an enum choice
        got, choices = msg.split(", expected one of ", 1)
        msg = f"must be one of {choices.strip('[]')}, got {got.removeprefix('Invalid value ')}"
    return f"{key or prefix}: {msg}" if (key or prefix) else msg


class _writable:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self) -> None:
        self.struct = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, self.struct)


def compose(
    config_name: str, overrides: list[str] | None = None, hydra_node: bool = False
) -> DictConfig:
    """Compose a config the way the entry point would (for tests, notebooks and tools).

    Without the ``hydra`` node, ``${hydra:...}`` interpolations cannot resolve: pass
    ``output_dir=...`` among the overrides for configs that use it.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name=config_name, overrides=overrides or [], return_hydra_config=hydra_node
        )


def plain(value: Any) -> Any:
    """A config value as plain Python (a node as dicts/lists with interpolations resolved, an
    enum as its value): what library arguments (TRL's configs, dataclasses) accept."""
    from enum import Enum

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value.value if isinstance(value, Enum) else value


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """A plain dict of the user-facing config (no ``hydra`` node), for manifests."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data  # type: ignore[return-value]
