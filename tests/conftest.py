"""Shared fixtures: everything offline, on CPU, with the embedded default models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lm_path() -> str:
    """The converted SmolLM2-135M-Instruct folder (converted once per machine)."""
    from ragtune.models import DEFAULT_LM, resolve_model

    return resolve_model(DEFAULT_LM)


@pytest.fixture(scope="session")
def tokenizer(lm_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_path)


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    """A private outputs root, so tests never touch the user's outputs/."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("RAGTUNE_OUTPUTS", str(root))
    return root
