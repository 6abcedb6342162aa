"""The manifest stamped into every trained model folder, and the checks serving makes.

``manifest.json`` records the prompt variant (name, fingerprint, skeleton), the retriever
settings, the base model, backend and training config, dataset stats, final loss, git
commit and library versions. It is written last and atomically, so a folder without one is
known to be incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.paths import PROJECT_ROOT, read_json_object

MANIFEST = "manifest.json"
# Retriever settings that change what a query returns: a model trained with one value must
# not silently be served with another.
RETRIEVER_KEYS = ("embedding_model", "normalize", "chunk_size", "chunk_overlap", "chunk_unit")
_LIBS = (
    "ragtune",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "sentence-transformers",
    "chromadb",
    "unsloth",
    "bitsandbytes",
)


class ManifestError(RagtuneError):
    """A model folder without a (valid) manifest, or a mismatch with the index or prompt."""


def library_versions() -> dict[str, str]:
    out = {}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def write_manifest(model_dir: str | Path, data: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file then rename); call it last."""
    model_dir = Path(model_dir)
    payload = {
        "format": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": library_versions(),
        **data,
        "files": file_digests(model_dir),
    }
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=model_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    path = model_dir / MANIFEST
    os.replace(tmp, path)
    return path


def file_digests(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a model folder (weights, configs, tokenizer, schema),
    so a truncated, corrupted or edited file is found before it is loaded."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(Path(model_dir).rglob("*")):
        rel = p.relative_to(model_dir).as_posix()
        if not p.is_file() or rel == MANIFEST or rel.startswith("."):
            continue
        out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_problems(model_dir: Path, files: dict[str, Any]) -> list[str]:
    """Files of ``model_dir`` that differ from the manifest's record of them."""
    out = []
    for rel, want in files.items():
        path = Path(model_dir) / rel
        if not isinstance(want, dict):
            out.append(f"{MANIFEST}: files.{rel} must be an object")
        elif not path.is_file():
            out.append(f"{path} is missing")
        elif path.stat().st_size != want.get("bytes"):
            out.append(
                f"{path} has {path.stat().st_size} bytes, the manifest says {want.get('bytes')} "
                "(truncated or replaced)"
            )
        elif sha256_file(path) != want.get("sha256"):
            out.append(f"{path} differs from the manifest's sha256 (corrupted or edited)")
    return out


# key -> (types, required): what serving reads from a manifest; anything else is not trusted
_SHAPE: dict[str, tuple[tuple[type, ...], str]] = {
    "retriever": ((dict,), "an object"),
    "prompt": ((dict,), "an object"),
    "model": ((dict,), "an object"),
    "raft": ((dict,), "an object"),
    "files": ((dict,), "an object"),
    "base_model": ((str,), "a string"),
    "backend": ((str,), "a string"),
    "save_method": ((str,), "a string"),
}


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest as a dict whose values serving reads have the right types; any other
    content is a :class:`ManifestError` naming the file and key (never a traceback later)."""
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise ManifestError(
            f"{path} not found: {model_dir} is not a complete ragtune model folder "
            "(training did not finish, or it is a plain base model)"
        )
    data = read_json_object(path, ManifestError)
    for key, (types, what) in _SHAPE.items():
        if key in data and not isinstance(data[key], types):
            raise ManifestError(f"{path}: {key} must be {what}, not {json.dumps(data[key])}")
    fp = (data.get("prompt") or {}).get("fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise ManifestError(f"{path}: prompt.fingerprint must be a string, not {json.dumps(fp)}")
    model = data.get("model") or {}
    msl = model.get("max_seq_length")
    if msl is not None and (not isinstance(msl, int) or isinstance(msl, bool) or msl <= 0):
        raise ManifestError(
            f"{path}: model.max_seq_length must be a positive integer, not {json.dumps(msl)}"
        )
    for key in ("dtype",):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise ManifestError(f"{path}: model.{key} must be a string")
    mode = (data.get("raft") or {}).get("mode")
    if mode is not None and mode not in ("rag", "closed"):
        raise ManifestError(f"{path}: raft.mode must be rag or closed, not {json.dumps(mode)}")
    return data


def mismatches(
    manifest: dict[str, Any], retriever: dict[str, Any], fingerprint: str | None
) -> list[str]:
    """Human-readable differences between what a model was trained with and what is in use.

    Every retriever key in use (``RETRIEVER_KEYS``, and ``corpus`` once the index is open) is
    compared; a key the manifest lacks is a difference, not a match, so deleting a manifest
    key cannot switch its check off. So is a missing prompt fingerprint (``fingerprint``
    None: the prompt is not checked here).
    """
    out = []
    trained = manifest.get("retriever")
    trained = trained if isinstance(trained, dict) else {}
    for key in (*RETRIEVER_KEYS, "corpus"):
        if key not in retriever:
            continue
        if key not in trained:
            out.append(f"retriever.{key}: missing from the manifest, index has {retriever[key]!r}")
        elif trained[key] != retriever[key]:
            out.append(
                f"retriever.{key}: model trained with {trained[key]!r}, index has {retriever[key]!r}"
            )
    if fingerprint is None:
        return out
    prompt = manifest.get("prompt")
    want = prompt.get("fingerprint") if isinstance(prompt, dict) else None
    if not want:
        out.append(f"prompt fingerprint: missing from the manifest, serving with {fingerprint}")
    elif want != fingerprint:
        out.append(f"prompt fingerprint: model trained with {want}, serving with {fingerprint}")
    return out
