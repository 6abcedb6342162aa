"""What a trained model folder says about how to ask it: the manifest overlay, in one place.

A trained folder carries its prompt schema (``prompt_schema.json``) and, in ``manifest.json``,
the model and retriever settings it was trained with; ``ragtune_train.json`` names its base
model and backend for the loader. Every reader of a trained folder (the RAG pipeline, the
LangChain LLM, the model loader, evaluation) takes those settings from here, and checks the
settings in use against the manifest here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ragtune.manifest import MANIFEST, RETRIEVER_KEYS, ManifestError, mismatches, read_manifest
from ragtune.paths import resolve_path
from ragtune.schema import SCHEMA_FILE, PromptSchema, get_schema

log = logging.getLogger(__name__)

TRAIN_INFO = "ragtune_train.json"  # backend, save method and base model, for load_model
# Where an index lives and how this machine runs it are not properties of the training: a
# manifest's values for these never override the config's (serving may follow the trained
# index location while it exists; see retriever_settings).
LOCATION_KEYS = ("persist_dir", "collection", "server")
_RUNTIME_KEYS = ("batch_size", "device")


class MismatchError(ManifestError):
    """The index or the prompt in use differ from what the model was trained with."""


# --------------------------------------------------------------------------- the folder
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_folder(model_dir: str | Path) -> Path:
    """The trained folder (a run folder's ``model/`` when a run folder is given)."""
    folder = resolve_path(str(model_dir))
    if not folder.exists():
        raise ManifestError(
            f"model_dir {folder} does not exist: train a model first (python train/sft.py, "
            "or make demo), or pass model_dir=null to ask the base model in model.name_or_path"
        )
    folder = folder.resolve()
    if not (folder / MANIFEST).exists() and (folder / "model" / MANIFEST).exists():
        folder = folder / "model"  # a run folder was given: its model is in model/
    return folder


def is_trained_folder(folder: Path) -> bool:
    """Whether ``folder`` carries ragtune's files (a manifest or a saved prompt schema)."""
    return (folder / MANIFEST).exists() or (folder / SCHEMA_FILE).exists()


def train_info(folder: Path) -> dict[str, Any]:
    """Base model, backend and save method of a trained folder (``ragtune_train.json``,
    else the manifest's keys); {} for a plain model folder."""
    info = read_json(folder / TRAIN_INFO)
    manifest = read_json(folder / MANIFEST)
    for key in ("base_model", "backend", "save_method"):
        if key not in info and key in manifest:
            info[key] = manifest[key]
    return info


def trained_schema(
    folder: Path, fallback: str, manifest: dict[str, Any] | None = None
) -> PromptSchema:
    """The schema the folder was trained with: its saved one, else the manifest's prompt
    name, else ``fallback``."""
    if (folder / SCHEMA_FILE).exists():
        return PromptSchema.load(folder)
    name = ((manifest or {}).get("prompt") or {}).get("name") or fallback
    return get_schema(name)


def trained_mode(manifest: dict[str, Any]) -> str:
    """``rag`` or ``closed``: how the model was trained (``raft.mode``)."""
    return str((manifest.get("raft") or {}).get("mode", "rag"))


# --------------------------------------------------------------------------- the overlay
def is_explicit(key: str, explicit: Iterable[str]) -> bool:
    """Whether ``key`` (``prompt``, ``retriever.k``) or its whole group was set by the user."""
    explicit = set(explicit)
    return key in explicit or key.split(".", 1)[0] in explicit


def model_settings(
    mine: dict[str, Any] | None, manifest: dict[str, Any], explicit: Iterable[str] = ()
) -> dict[str, Any]:
    """dtype and max_seq_length as trained (unless the user set them); trust only from the user.

    ``trust_remote_code`` never comes from the manifest: a model folder is data, and a
    folder must not be able to switch on the execution of code it ships.
    """
    trained = manifest.get("model") or {}
    mine = mine or {}
    out: dict[str, Any] = {"trust_remote_code": bool(mine.get("trust_remote_code", False))}
    for key, default in (("dtype", "auto"), ("max_seq_length", 1024)):
        if is_explicit(f"model.{key}", explicit) or trained.get(key) is None:
            out[key] = mine.get(key) if mine.get(key) is not None else default
        else:
            out[key] = trained[key]
    out["max_seq_length"] = int(out["max_seq_length"])
    return out


def retriever_settings(
    node: Any,
    manifest: dict[str, Any],
    explicit: Iterable[str] = (),
    *,
    index: str = "trained",
) -> Any:
    """The config's retriever (``node``) with the manifest's settings over it, then the user's.

    ``index="trained"`` (serving): the index location follows the manifest while the place it
    names still exists, unless the user set it. ``index="own"`` (evaluation): the index
    location is always the config's, chunked with the settings the model was trained with.
    """
    from ragtune.config import RetrieverConfig
    from ragtune.store import as_rcfg

    explicit = set(explicit)
    rcfg = as_rcfg(node or {})
    trained = manifest.get("retriever") or {}
    fields = {f.name for f in dataclasses.fields(RetrieverConfig)}
    updates = {
        k: v
        for k, v in trained.items()
        if k in fields
        and k not in (*LOCATION_KEYS, *_RUNTIME_KEYS)
        and not is_explicit(f"retriever.{k}", explicit)
    }
    if index == "trained":
        updates.update(_trained_location(rcfg, trained, explicit))
    elif index != "own":
        raise ValueError(f"index must be 'trained' or 'own', got {index!r}")
    try:  # typed like the config, so a wrong type stops here in one line
        return as_rcfg({**dataclasses.asdict(rcfg), **updates})
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ManifestError(f"{MANIFEST}: a retriever value has the wrong type ({first})") from None


def _trained_location(rcfg: Any, trained: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The collection the model was trained on, unless the user picked other chunk settings
    # (then the name derived from them finds, or fails to find, the matching index).
    if trained.get("collection") and not any(
        is_explicit(f"retriever.{k}", explicit) for k in (*RETRIEVER_KEYS, "collection")
    ):
        out["collection"] = trained["collection"]
    if is_explicit("retriever.persist_dir", explicit) or is_explicit("retriever.server", explicit):
        return out
    # A model copied to another machine uses the configured index instead.
    where = trained.get("persist_dir")
    if trained.get("server"):
        out["server"] = trained["server"]
    elif where and Path(where).is_dir():
        out["persist_dir"] = where
    elif where:
        log.warning(
            "the index the model was trained on (%s) is gone; using %s", where, rcfg.persist_dir
        )
    return out


# --------------------------------------------------------------------------- checks
def settle(folder: Path, problems: list[str], allow_mismatch: bool) -> None:
    """Raise :class:`MismatchError` on any difference, or only warn with ``allow_mismatch``."""
    if not problems:
        return
    msg = f"{folder} was trained with other settings than are in use: " + "; ".join(problems)
    if not allow_mismatch:
        raise MismatchError(msg + " (allow_mismatch=true serves anyway)")
    warnings.warn(msg + " (allow_mismatch=true: serving anyway)", stacklevel=3)
    log.warning("%s (allow_mismatch=true: serving anyway)", msg)


def check_files(folder: Path, manifest: dict[str, Any], allow_mismatch: bool) -> None:
    """Every file the manifest records is there, whole and unchanged (one line naming the
    first that is not); a manifest without the record is a mismatch, not a pass."""
    from ragtune.manifest import file_problems

    files = manifest.get("files")
    if files is None:
        settle(
            folder, [f"{MANIFEST} has no files record to check the folder against"], allow_mismatch
        )
        return
    problems = file_problems(folder, files)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(problems[0] + more)


def check_settings(
    folder: Path, manifest: dict[str, Any], rcfg: Any, schema: PromptSchema, allow_mismatch: bool
) -> None:
    """The retriever settings and prompt in use against the manifest (before any loading)."""
    in_use = {k: getattr(rcfg, k) for k in RETRIEVER_KEYS}
    settle(folder, mismatches(manifest, in_use, schema.fingerprint), allow_mismatch)


def open_trained_retriever(
    folder: Path,
    rcfg: Any,
    manifest: dict[str, Any],
    allow_mismatch: bool,
    token_counter: Any = None,
) -> Any:
    """Open the index; one built with other settings, or from another corpus, than the
    manifest's is refused (the prompt was settled by :func:`check_settings`)."""
    from ragtune.retriever import Retriever
    from ragtune.store import CORPUS_KEY, IndexMismatchError, find_collection, open_client

    try:
        retriever = Retriever.from_config(rcfg, token_counter=token_counter)
    except IndexMismatchError as e:
        client = open_client(rcfg)
        try:
            name = rcfg.collection or find_collection(client, rcfg)
        except IndexMismatchError:
            raise e from None
        meta = client.get_collection(name).metadata or {}
        index = {k: meta[f"ragtune_{k}"] for k in RETRIEVER_KEYS if f"ragtune_{k}" in meta}
        index["corpus"] = meta.get(CORPUS_KEY)
        problems = mismatches(manifest, index, None) or [f"index collection settings {index}"]
        settle(folder, problems, allow_mismatch)
        rcfg = dataclasses.replace(rcfg, **{k: v for k, v in index.items() if k != "corpus"})
        return Retriever.from_config(rcfg, token_counter=token_counter)
    settle(folder, mismatches(manifest, retriever.settings(), None), allow_mismatch)
    return retriever


def command_line_keys() -> list[str]:
    """Dotted keys the user set on the command line (Hydra's task overrides), if any.

    Those win over a model's manifest; ``conf=`` presets do not count (the manifest wins).
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        task = HydraConfig.get().overrides.task
    except Exception:
        return []
    keys = []
    for item in task:
        key = item.split("=", 1)[0].lstrip("+~")
        if key != "conf":
            keys.append(key)
    return keys


__all__ = [
    "LOCATION_KEYS",
    "TRAIN_INFO",
    "MismatchError",
    "check_files",
    "check_settings",
    "command_line_keys",
    "is_explicit",
    "is_trained_folder",
    "model_folder",
    "model_settings",
    "mismatches",
    "open_trained_retriever",
    "read_manifest",
    "retriever_settings",
    "settle",
    "train_info",
    "trained_mode",
    "trained_schema",
]
