"""Early validation and composition of the config of every Hydra entry point.

The YAML under conf/ holds every default; this module checks a composed config against the
typed schema (``ragtune.config_schema``: types, choices as enums, ranges) before any model
loads, so a typo, a wrong type or an impossible combination is a one-line error that names the
key (``retriever.chunk_overlap``), never a traceback from inside a library.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ragtune.config_schema import (
    BACKENDS,
    DTYPES,
    EVAL_MODES,
    FSDP_OPTIONS,
    GROUP_SCHEMAS,
    RANGES,
    SAMPLINGS,
    SAVE_METHODS,
    AnswerFeature,
    Backend,
    CalibrationExtremes,
    ChunkUnit,
    DataConfig,
    DType,
    EvalConfig,
    EvalModelsConfig,
    GenerateConfig,
    LoraConfig,
    ModelConfig,
    PathsConfig,
    PreferenceConfig,
    PreferenceLoss,
    PromptConfig,
    RaftConfig,
    RaftMode,
    RetrieverConfig,
    Sampling,
    SaveMethod,
    ServerConfig,
    TrainConfig,
    defaults_from,
)
from ragtune.errors import RagtuneError
from ragtune.paths import CONF_DIR, current_project

# the schema's names are part of this module's API: ``from ragtune.config import RetrieverConfig``
__all__ = [
    "ConfigError",
    "compose",
    "plain",
    "to_container",
    "validate",
    "defaults_from",
    "Backend",
    "SaveMethod",
    "PreferenceLoss",
    "Sampling",
    "DType",
    "RaftMode",
    "CalibrationExtremes",
    "AnswerFeature",
    "ChunkUnit",
    "PathsConfig",
    "ModelConfig",
    "RetrieverConfig",
    "PromptConfig",
    "DataConfig",
    "RaftConfig",
    "LoraConfig",
    "PreferenceConfig",
    "TrainConfig",
    "GenerateConfig",
    "ServerConfig",
    "EvalModelsConfig",
    "EvalConfig",
    "EVAL_MODES",
    "BACKENDS",
    "SAVE_METHODS",
    "SAMPLINGS",
    "DTYPES",
    "FSDP_OPTIONS",
    "GROUP_SCHEMAS",
    "RANGES",
]

log = logging.getLogger(__name__)

if not OmegaConf.has_resolver("ragtune_root"):
    OmegaConf.register_new_resolver("ragtune_root", lambda: str(current_project()))


class ConfigError(RagtuneError, ValueError):
    """A configuration a user can fix; the message names the key."""


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
        raise ConfigError(_one_line(_first_unresolvable(cfg) or e)) from None
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
        else:
            _check_type(str(key), cfg[key], top_level[key])
    for key, bounds in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            _check_range(key, value, *bounds)
    _check_combinations(cfg)
    return cfg


def _check_type(key: str, value: Any, want: type) -> None:
    """An entry point's own key: ``seed=soon`` is refused here, not deep inside a library."""
    if value is None:
        return
    if want is str:  # Hydra reads question=2024 as a number: any single value is text
        ok = not isinstance(value, DictConfig | ListConfig)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is dict:
        ok = isinstance(value, DictConfig)
    else:
        ok = isinstance(value, want)
    if not ok:
        name = {str: "text", int: "an integer", bool: "true or false", dict: "a mapping"}
        raise ConfigError(f"{key}: must be {name.get(want, want.__name__)}, got {value!r}")


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
        need(
            r.ef_search >= r.fetch_k,
            "retriever.ef_search",
            f"must be >= retriever.fetch_k ({r.fetch_k}), got {r.ef_search}",
        )
        need(
            r.reader_rerank == 0 or r.reader_rerank > r.k,
            "retriever.reader_rerank",
            f"must be 0 (off) or more than retriever.k ({r.k}), got {r.reader_rerank}",
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


def _first_unresolvable(node: DictConfig | ListConfig) -> OmegaConfBaseException | None:
    """The error of the first value that cannot resolve, read where it sits: resolving the
    whole config says which interpolation failed but not which key holds it."""
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        try:
            value = node[key]
        except OmegaConfBaseException as e:
            return e
        if isinstance(value, DictConfig | ListConfig) and (found := _first_unresolvable(value)):
            return found
    return None


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
