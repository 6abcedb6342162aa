"""Shared fixtures: everything offline, on CPU, with the embedded default models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb
# Sleeping (not spinning) OpenMP workers: on a busy 2-core machine spinning makes each small
# torch op ~100x slower (16 ms vs 0.15 ms for a 64-wide Linear); read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


def trials(full: int, ci: int) -> int:
    """Trials for a crash test: ``full``, or ``ci`` where CI sets ``RAGTUNE_CI=1`` (.ci/run).

    CI runs the same code paths with fewer repetitions to stay inside its time limit.
    """
    return min(full, ci) if os.environ.get("RAGTUNE_CI") == "1" else full


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker itself: item.keywords also holds folder names (a checkout named gpu/)
        if item.get_closest_marker("gpu") is not None:
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


def sigkill_when_ready(code: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run ``code`` in a fresh Python; SIGKILL it as soon as it prints ``ready``.

    Crash-safety tests use a real kill (no ``finally``, no cleanup), not an exception.
    """
    import signal
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the child never got ready: {line!r} {proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture()
def no_model_loads(monkeypatch) -> list[str]:
    """Every way training or serving gets a model fails the test (and is recorded).

    For "refused before any model loads": a folder that appears only at the first save
    cannot show that no model was loaded.
    """
    from transformers import AutoModelForCausalLM

    import ragtune.models
    import ragtune.training.backends

    calls: list[str] = []

    def refuse(name: str):
        def loader(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: a model was loaded before the refusal")

        return loader

    monkeypatch.setattr(ragtune.models, "resolve_model", refuse("resolve_model"))
    monkeypatch.setattr(ragtune.training.backends, "load", refuse("backends.load"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))
    return calls


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    """A private outputs root, so tests never touch the user's outputs/."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("RAGTUNE_OUTPUTS", str(root))
    return root


# Prompts that end differently (no shared last token), for the equivalence tests.
DIFFERENT_ENDINGS = [
    "Question: What is the capital of France?\nAnswer:",
    "Context: the sky is blue.\nQuestion: what colour is the sky",
    "Tell me a story about a dragon and",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory, lm_path: str) -> str:
    """A 2-layer, 64-wide untied Llama with SmolLM2's tokenizer: trains and generates in ms.

    Seeded random weights, untied input/output embeddings and a wide init (0.2): attention
    moves the residual stream enough that greedy output depends on every position, the cache
    and the mask (tests/test_tiny_model.py shows a broken one changes it). A tied, 0.02-init
    model just echoes its last input token, which hides decoding bugs. Use it for mechanics
    and equivalence; the real SmolLM2 only where answer quality matters.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-lm")
    config = AutoConfig.from_pretrained(lm_path)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "tie_word_embeddings": False,
            "initializer_range": 0.2,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(lm_path).save_pretrained(out)
    return str(out)


BATCH_PROMPTS = (
    "### Instruction:\nWho built the lighthouse?\n\n### Context:\nThe harbour of Kessa",
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Ida Varnholm designed the breakwater and the tide gauge.",
    "1871",
)


@pytest.fixture(scope="session")
def batch_prompts() -> tuple[str, ...]:
    """Prompts of different lengths and kinds for the decode and batching tests."""
    return BATCH_PROMPTS


@pytest.fixture(scope="module")
def tiny_lm_f32(tiny_lm_path):
    """(model, tokenizer): ``tiny_lm_path``'s architecture, freshly seeded, float32, eval mode:
    exact enough on CPU that batched and one-at-a-time decoding must agree token for token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    config = AutoConfig.from_pretrained(tiny_lm_path)
    config.update({"tie_word_embeddings": False, "initializer_range": 0.2})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tok
