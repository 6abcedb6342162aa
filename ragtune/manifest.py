"""The manifest stamped into every trained model folder, and the checks serving makes.

``manifest.json`` records the prompt variant (name, fingerprint, skeleton), the retriever
settings, the base model, backend and training config, dataset stats, final loss, git
commit and library versions. It is written last and atomically, so a folder without one is
known to be incomplete.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.paths import PROJECT_ROOT

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


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise ManifestError(
            f"{path} not found: {model_dir} is not a complete ragtune model folder "
            "(training did not finish, or it is a plain base model)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None


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
