"""Where things live: the project root, the model cache and the outputs root.

Paths resolve from the project root, not from the current directory, so every entry point
behaves the same wherever it is started from.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = PROJECT_ROOT / "prompts"
CONF_DIR = PROJECT_ROOT / "conf"
DATA_DIR = PROJECT_ROOT / "data"


def cache_dir() -> Path:
    """Model cache (converted default models). Override with ``RAGTUNE_CACHE``."""
    return Path(os.environ.get("RAGTUNE_CACHE", Path.home() / ".cache" / "ragtune")).expanduser()


def outputs_root() -> Path:
    """Root of all run, sweep, index and model outputs. Override with ``RAGTUNE_OUTPUTS``."""
    return Path(os.environ.get("RAGTUNE_OUTPUTS", PROJECT_ROOT / "outputs")).expanduser()


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A user path: absolute as given, relative ones against the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
