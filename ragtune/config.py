"""Config schema and early validation for every Hydra entry point.

Hydra composes YAML; this module checks the result against typed dataclasses before any
model loads, so a typo, a wrong type or an impossible combination is a one-line error that
names the key (``retriever.chunk_overlap``), never a traceback from inside a library.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ragtune.errors import RagtuneError
from ragtune.paths import CONF_DIR, PROJECT_ROOT

log = logging.getLogger(__name__)

if not OmegaConf.has_resolver("ragtune_root"):
    OmegaConf.register_new_resolver("ragtune_root", lambda: str(PROJECT_ROOT))


class ConfigError(RagtuneError, ValueError):
    """A configuration a user can fix; the message names the key."""


# --------------------------------------------------------------------------- schema
@dataclass
class PathsConfig:
    root: str = str(PROJECT_ROOT)
    outputs: str = str(PROJECT_ROOT / "outputs")


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    load_in_4bit: bool = False
    max_seq_length: int = 1024
    trust_remote_code: bool = False


@dataclass
class RetrieverConfig:
    embedding_model: str = "minilm-l6"
    normalize: bool = True
    batch_size: int = 64
    device: str = "auto"
    chunk_size: int = 1000
    chunk_overlap: int = 100
    chunk_unit: str = "chars"
    k: int = 3
    fetch_k: int = 20
    dedup_cosine: float = 0.95
    dedup_overlap: float = 0.5
    hybrid: bool = False
    mmr: bool = False
    mmr_lambda: float = 0.5
    context_tokens: int = 0
    persist_dir: str = ""
    collection: str | None = None
    server: str | None = None
    max_file_bytes: int = 50_000_000


@dataclass
class PromptConfig:
    name: str = "alpaca_rag"


@dataclass
class DataConfig:
    corpus: str = ""
    qa_train: str | None = ""  # empty / null: no QA file yet (train/gen_qa.py makes one)
    qa_eval: str = ""
    jsonl_text_field: str = "text"
    max_records: int = 0


@dataclass
class RaftConfig:
    mode: str = "rag"  # rag: retrieved contexts; closed: no context (the closed-book baseline)
    oracle_fraction: float = 0.8
    abstain_without_oracle: bool = True
    unanswerable_fraction: float | None = None
    shuffle_oracle: bool = True
    num_preview: int = 3


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names


@dataclass
class TrainConfig:
    backend: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    optim: str = "adamw_torch_fused"  # a transformers OptimizerNames value
    packing: bool = False
    padding_free: Any = "auto"  # "auto", true or false (unpacked batches; see ragtune.train)
    sampling: str = "random"  # random | group_by_length
    gradient_checkpointing: Any = False  # bool or "unsloth"
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    resume: bool = False
    save_method: str = "merged_16bit"
    eval_after: bool = False
    fsdp: str = ""  # "" = DDP; else FSDP options, e.g. "full_shard auto_wrap" (FSDP_OPTIONS)


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stream: bool = True
    fast: bool = False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    api_key: str | None = None  # Bearer key; null = none (env RAGTUNE_API_KEY in server.yaml)
    max_body_bytes: int = 65536  # larger request bodies get 413
    max_queue: int = 256  # requests waiting for the model beyond this get 429
    model_id: str | None = None  # the name in /v1/models; null = the model's run folder name
    log_level: str = "warning"
    keep_alive_s: int = 75  # idle keep-alive; longer than clients' (httpx: 5 s) avoids reset races


@dataclass
class EvalModelsConfig:
    base: str | None = None  # base_rag's model; null = model.name_or_path
    ft_closed: str | None = None  # closed-book fine-tune (ft_closed, ft_then_rag)
    raft_rag: str | None = None  # ragtune's co-designed model (raft_rag)


@dataclass
class EvalConfig:
    modes: list[str] | None = None  # null = base_rag + every mode whose model is given
    models: EvalModelsConfig = field(default_factory=EvalModelsConfig)
    batch_size: int = 8
    max_questions: int = 0
    ingest: bool = True
    corpus: str = ""  # corpus indexed for evaluation; empty = data.corpus
    persist_dir: str = ""  # index folder for evaluation; empty = retriever.persist_dir
    device: str = "auto"


EVAL_MODES = ("base_rag", "ft_closed", "ft_then_rag", "raft_rag")
BACKENDS = ("auto", "hf", "unsloth")
SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
SAMPLINGS = ("random", "group_by_length")
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
DTYPES = ("auto", "float32", "bfloat16", "float16")

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


# --------------------------------------------------------------------------- validation
def validate(cfg: DictConfig, top_level: dict[str, type] | None = None) -> DictConfig:
    """Check types, unknown keys and value ranges; return the resolved config.

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
    _check_values(cfg)
    return cfg


def _check_values(cfg: DictConfig) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    if "retriever" in cfg:
        r = cfg.retriever
        need(r.chunk_size > 0, "retriever.chunk_size", f"must be > 0, got {r.chunk_size}")
        need(
            0 <= r.chunk_overlap < r.chunk_size,
            "retriever.chunk_overlap",
            f"must be >= 0 and < retriever.chunk_size ({r.chunk_size}), got {r.chunk_overlap}",
        )
        need(r.k > 0, "retriever.k", f"must be > 0, got {r.k}")
        need(
            r.fetch_k >= r.k,
            "retriever.fetch_k",
            f"must be >= retriever.k ({r.k}), got {r.fetch_k}",
        )
        need(
            r.chunk_unit in ("chars", "tokens"),
            "retriever.chunk_unit",
            f"must be chars or tokens, got {r.chunk_unit!r}",
        )
        need(
            0.0 < r.dedup_cosine <= 1.0,
            "retriever.dedup_cosine",
            f"must be in (0, 1], got {r.dedup_cosine}",
        )
        need(
            0.0 <= r.mmr_lambda <= 1.0,
            "retriever.mmr_lambda",
            f"must be in [0, 1], got {r.mmr_lambda}",
        )
        need(r.batch_size > 0, "retriever.batch_size", f"must be > 0, got {r.batch_size}")
        need(
            0.0 < r.dedup_overlap <= 1.0,
            "retriever.dedup_overlap",
            f"must be in (0, 1], got {r.dedup_overlap}",
        )
        need(
            r.max_file_bytes >= 0,
            "retriever.max_file_bytes",
            f"must be >= 0 (0 = no limit), got {r.max_file_bytes}",
        )
        need(
            r.context_tokens >= 0,
            "retriever.context_tokens",
            f"must be >= 0, got {r.context_tokens}",
        )
    if "model" in cfg:
        m = cfg.model
        need(bool(m.name_or_path), "model.name_or_path", "must name a model")
        need(
            m.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}, got {m.dtype!r}"
        )
        need(
            m.max_seq_length >= 64, "model.max_seq_length", f"must be >= 64, got {m.max_seq_length}"
        )
        _check_model_name(m.name_or_path)
    if "prompt" in cfg:
        from ragtune.schema import PromptError, get_schema

        try:
            get_schema(cfg.prompt.name)
        except PromptError as e:
            raise ConfigError(f"prompt.name: {e}") from None
    if "raft" in cfg:
        p = cfg.raft.oracle_fraction
        need(0.0 <= p <= 1.0, "raft.oracle_fraction", f"must be in [0, 1], got {p}")
        u = cfg.raft.get("unanswerable_fraction")
        need(
            u is None or 0.0 <= u <= 1.0,
            "raft.unanswerable_fraction",
            f"must be null or in [0, 1], got {u}",
        )
        need(
            cfg.raft.mode in ("rag", "closed"),
            "raft.mode",
            f"must be rag or closed, got {cfg.raft.mode!r}",
        )
    if "train" in cfg:
        t = cfg.train
        need(
            t.backend in BACKENDS,
            "train.backend",
            f"must be one of {', '.join(BACKENDS)}, got {t.backend!r}",
        )
        need(
            t.save_method in SAVE_METHODS,
            "train.save_method",
            f"must be one of {', '.join(SAVE_METHODS)}, got {t.save_method!r}",
        )
        need(t.lora.r > 0, "train.lora.r", f"must be > 0, got {t.lora.r}")
        need(
            0.0 <= t.lora.dropout < 1.0,
            "train.lora.dropout",
            f"must be in [0, 1), got {t.lora.dropout}",
        )
        need(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
        need(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
        need(t.grad_accum > 0, "train.grad_accum", f"must be > 0, got {t.grad_accum}")
        need(
            t.epochs > 0 or t.max_steps > 0,
            "train.epochs",
            "train.epochs or train.max_steps must be > 0",
        )
        need(t.save_steps > 0, "train.save_steps", f"must be > 0, got {t.save_steps}")
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
        need(
            t.sampling in SAMPLINGS,
            "train.sampling",
            f"must be one of {', '.join(SAMPLINGS)}, got {t.sampling!r}",
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
        e = cfg.eval
        for mode in e.modes or []:
            need(
                mode in EVAL_MODES,
                "eval.modes",
                f"unknown mode {mode!r}; choose from {', '.join(EVAL_MODES)}",
            )
        need(e.batch_size > 0, "eval.batch_size", f"must be > 0, got {e.batch_size}")
        need(
            e.max_questions >= 0,
            "eval.max_questions",
            f"must be >= 0 (0 = all), got {e.max_questions}",
        )
    if "generate" in cfg:
        g = cfg.generate
        need(
            g.max_new_tokens > 0, "generate.max_new_tokens", f"must be > 0, got {g.max_new_tokens}"
        )
        need(g.temperature >= 0, "generate.temperature", f"must be >= 0, got {g.temperature}")
        need(0 < g.top_p <= 1, "generate.top_p", f"must be in (0, 1], got {g.top_p}")
    if "server" in cfg:
        v = cfg.server
        need(0 <= v.port <= 65535, "server.port", f"must be in [0, 65535], got {v.port}")
        need(v.max_body_bytes > 0, "server.max_body_bytes", f"must be > 0, got {v.max_body_bytes}")
        need(v.max_queue > 0, "server.max_queue", f"must be > 0, got {v.max_queue}")
        need(bool(v.host), "server.host", "must name an address, e.g. 127.0.0.1")


def _check_model_name(name: str) -> None:
    """A local-looking model path must exist (checked before anything loads)."""
    from ragtune.models import DEFAULT_LM, ModelNotFoundError, _resolve_other

    if name == DEFAULT_LM:
        return
    try:
        _resolve_other(name, "model")
    except ModelNotFoundError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None


def _one_line(e: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(e, "full_key", None) or ""
    if prefix and key and not key.startswith(prefix):
        key = f"{prefix}.{key}"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key or prefix}'"
    return f"{key or prefix}: {msg}" if (key or prefix) else msg


class _writable:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self) -> None:
        self.struct = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, self.struct)


# --------------------------------------------------------------------------- entry points
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn errors a user can act on into one line on stderr and exit status 2.

    Wraps the body of a Hydra task function. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RagtuneError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


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


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """A plain dict of the user-facing config (no ``hydra`` node), for manifests."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data  # type: ignore[return-value]
