"""Resuming into a finished run never loses its model: the new one is written beside it, gets
its manifest, and only then is swapped in; a crash anywhere before leaves the old one whole."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.paths import PROJECT_ROOT


def _overrides(outputs: Path, tiny_lm_path: str) -> list[str]:
    return [
        f"output_dir={outputs / 'run'}",
        f"paths.outputs={outputs}",
        f"model.name_or_path={tiny_lm_path}",
        "model.max_seq_length=384",
        "retriever.chunk_size=400",
        "retriever.chunk_overlap=40",
        "data.max_records=8",
        "train.max_steps=2",
        "train.per_device_train_batch_size=4",
        "train.save_steps=100",
        "train.resume=true",
    ]


def _fingerprint(model: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model.iterdir())
        if p.is_file()
    }


@pytest.fixture()
def finished_run(outputs, tiny_lm_path):
    from ragtune.config import compose
    from ragtune.training import run_sft

    overrides = _overrides(outputs, tiny_lm_path)
    run_sft(compose("sft", overrides))
    model = outputs / "run" / "model"
    assert (model / "manifest.json").exists()
    return model, overrides, _fingerprint(model)


def test_a_crash_before_the_manifest_keeps_the_finished_model(finished_run, monkeypatch):
    import ragtune.training.recipe as recipe
    from ragtune.config import compose

    model, overrides, before = finished_run

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed during eval_after / before the manifest

    with monkeypatch.context() as m:
        m.setattr(recipe, "_write_manifest", crash)
        with pytest.raises(KeyboardInterrupt):
            recipe.run_sft(compose("sft", overrides + ["seed=7"]))
    assert _fingerprint(model) == before  # untouched, manifest included
    assert (model.parent / ".new-model" / "model.safetensors").exists()  # the new one, beside
    recipe.run_sft(compose("sft", overrides + ["seed=7"]))  # the next run finishes and swaps
    assert json.loads((model / "manifest.json").read_text())["seed"] == 7
    assert sorted(p.name for p in model.parent.iterdir() if p.name.startswith(".")) == []


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    from ragtune.training.saving import publish_model, recover_model, staging_dir

    model = tmp_path / "run" / "model"
    staged = staging_dir(model)
    for folder, tag in ((model, "old"), (staged, "new")):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"tag": tag}))
    (tmp_path / "run" / ".tmp-model-abc123").mkdir()  # an empty leftover of a killed save
    os.replace(model, model.with_name(".old-model"))  # killed right after the first rename
    recover_model(model)
    assert json.loads((model / "manifest.json").read_text()) == {"tag": "new"}
    assert not (tmp_path / "run" / ".tmp-model-abc123").exists()
    publish_model(model, model)  # publishing in place is a no-op
    (staged).mkdir()
    with pytest.raises(Exception, match="has no manifest.json"):
        publish_model(staged, model)


KILLED_RESUME = """
import json, os, signal, sys
import ragtune.training.recipe as recipe
from ragtune.config import compose

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

recipe._write_manifest = die
recipe.run_sft(compose("sft", json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_sigkill_while_resuming_into_a_finished_run_keeps_its_model(finished_run, outputs):
    model, overrides, before = finished_run
    env = {**os.environ, "RAGTUNE_OUTPUTS": str(outputs)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RESUME, json.dumps(overrides + ["seed=9"])],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _fingerprint(model) == before
    from ragtune.manifest import read_manifest

    assert read_manifest(model)["seed"] != 9
