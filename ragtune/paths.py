"""Where things live: the package's own data, the user's project, the cache and the outputs.

Two roots, kept apart:

- the package: ``prompts/`` and ``conf/`` ship inside it (in a checkout ``ragtune/prompts``
  and ``ragtune/conf`` link to the top-level folders), so an installed wheel finds them;
- the project: the folder a command works in. Paths a user types resolve from the current
  directory, and outputs go under the project's ``outputs/`` (``RAGTUNE_OUTPUTS`` moves them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = PACKAGE_DIR / "prompts"
CONF_DIR = PACKAGE_DIR / "conf"
# The ragtune source tree (its scripts, demo data and git history) when ragtune runs from a
# checkout; installed from a wheel this folder is site-packages and holds none of them.
PROJECT_ROOT = PACKAGE_DIR.parent
DATA_DIR = PROJECT_ROOT / "data"


def _is_checkout(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / "ragtune").is_dir()


def current_project() -> Path:
    """The project a command works in.

    ``RAGTUNE_ROOT`` if set; else the ragtune checkout when the current directory is inside
    it (``python train/sft.py`` from any of its folders uses the same ``outputs/``); else the
    current directory (a ``pip install``-ed ragtune used in the user's own folder).
    """
    env = os.environ.get("RAGTUNE_ROOT")
    if env:
        return Path(env).expanduser().absolute()
    cwd = Path.cwd()
    if _is_checkout(PROJECT_ROOT) and cwd.resolve().is_relative_to(PROJECT_ROOT):
        return PROJECT_ROOT
    return cwd


def cache_dir() -> Path:
    """Model cache (converted default models). Override with ``RAGTUNE_CACHE``."""
    return Path(os.environ.get("RAGTUNE_CACHE", Path.home() / ".cache" / "ragtune")).expanduser()


def outputs_root() -> Path:
    """Root of all run, sweep, index and model outputs: ``RAGTUNE_OUTPUTS``, else the
    current project's ``outputs/``."""
    env = os.environ.get("RAGTUNE_OUTPUTS")
    return resolve_path(env) if env else current_project() / "outputs"


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A user path: absolute as given, relative ones against the current directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """The JSON object stored at an existing ``path``; bad JSON or another JSON type raise
    ``error`` naming the file (a one-line message, never a decoder traceback)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data
