"""Resuming into a finished run never loses its model: the new one is written beside it, gets
its manifest, and only then is swapped in; a crash anywhere before leaves the old one whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


# --------------------------------------------------------------------------- the save itself
@pytest.fixture()
def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on during the test, in order."""
    paths: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


class _Recorder:
    """Stands in for a model, tokenizer or schema: records what it was asked to save."""

    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def _write(self, out, what: str, **kw) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{self.name}.{what}").write_text("weights")
        self.calls.append((self.name, what, str(out), kw))

    def save_pretrained(self, out, **kw) -> None:
        self._write(out, "save_pretrained", **kw)

    def save_pretrained_merged(self, out, tokenizer, **kw) -> None:
        self._write(out, "save_pretrained_merged", **kw)

    def save(self, out) -> None:
        self._write(out, "save")


@pytest.mark.parametrize(
    ("save_method", "call", "unsloth_method"),
    [
        ("lora", "save_pretrained", None),
        ("merged_16bit", "save_pretrained_merged", "merged_16bit"),
        ("merged_4bit", "save_pretrained_merged", "merged_4bit_forced"),
    ],
)
def test_the_unsloth_backend_saves_through_unsloth_and_syncs_every_file(
    tmp_path, synced, save_method, call, unsloth_method
):
    import ragtune.training.saving as saving

    calls: list = []
    model_dir = tmp_path / "run" / "model"
    staged = saving.save_model(
        _Recorder(calls, "model"),
        _Recorder(calls, "tokenizer"),
        _Recorder(calls, "schema"),
        model_dir,
        save_method=save_method,
        backend="unsloth",
        base_model="base",
        base_path="/models/base",
    )
    assert staged == saving.staging_dir(model_dir) and not model_dir.exists()
    assert [(who, what) for who, what, _, _ in calls] == [
        ("model", call),
        ("tokenizer", "save_pretrained"),
        ("schema", "save"),
    ]
    assert calls[0][2] == str(staged)
    method = {"save_method": unsloth_method} if unsloth_method else {}
    assert calls[0][3] == {**method, "safe_serialization": True}
    from ragtune.modelcard import TRAIN_INFO

    info = json.loads((staged / TRAIN_INFO).read_text())
    assert info["backend"] == "unsloth" and info["save_method"] == save_method
    files = {str(p) for p in staged.rglob("*") if p.is_file()}
    assert len(files) == 4 and files <= set(synced)  # every file on disk before the swap


def test_publishing_swaps_the_new_model_in_and_syncs_the_folder_that_names_it(tmp_path, synced):
    import ragtune.training.saving as saving

    model = tmp_path / "run" / "model"
    staged = saving.staging_dir(model)
    for folder, tag in ((model, "old"), (staged, "new")):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"tag": tag}))
    open_fds = len(os.listdir("/proc/self/fd"))
    assert saving.publish_model(staged, model) == model
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the folder's descriptor closed
    assert json.loads((model / "manifest.json").read_text()) == {"tag": "new"}
    assert sorted(p.name for p in model.parent.iterdir()) == ["model"]  # old one gone
    assert synced == [str(model.parent)]  # the renames reach the disk before anything else


def test_a_qlora_adapter_is_merged_into_a_16bit_copy_of_the_base(tmp_path, tiny_lm_path):
    """The QLoRA path (a 4-bit base, CUDA only) run on CPU: the adapter goes onto the base
    reloaded in 16 bits, and the adapter folder it passed through is gone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.training.saving import _merge_onto_16bit_base

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_path), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter
    out = tmp_path / ".new-model"
    out.mkdir()
    merged = _merge_onto_16bit_base(model, tiny_lm_path, out, torch.bfloat16)
    expected = model.merge_and_unload().to(torch.bfloat16).state_dict()
    got = merged.state_dict()
    assert merged.dtype == torch.bfloat16 and set(got) == set(expected)
    q = "model.layers.0.self_attn.q_proj.weight"
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path).state_dict()[q]
    assert not torch.allclose(got[q].float(), base.to(torch.bfloat16).float())  # the delta is in
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-2, rtol=1e-2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new-model"]  # adapter removed


def test_latest_points_at_the_new_model_past_a_stale_link_of_a_killed_run(tmp_path):
    from ragtune.training.saving import point_latest

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    old, new = tmp_path / "old" / "model", tmp_path / "new" / "model"
    for m in (old, new):
        m.mkdir(parents=True)
    point_latest(old, outputs)
    # a run killed between making its temporary link and renaming it left this behind
    (outputs / f".latest-{os.getpid()}").symlink_to(tmp_path / "gone")
    point_latest(new, outputs)
    assert (outputs / "latest").resolve() == new.resolve()
    assert sorted(p.name for p in outputs.iterdir()) == ["latest"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_manifest_returns_its_path_and_records_the_commit_trained_from(tmp_path, monkeypatch):
    import ragtune.manifest as manifest

    repo, model = tmp_path / "repo", tmp_path / "model"
    repo.mkdir()
    model.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    monkeypatch.setattr(manifest, "PROJECT_ROOT", repo)
    assert manifest.write_manifest(model, {}) == model / "manifest.json"
    assert manifest.read_manifest(model)["git_commit"] == head.stdout.strip()
    # an installed copy (no checkout) records no commit rather than failing
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(manifest, "PROJECT_ROOT", model)
    manifest.write_manifest(model, {})
    assert manifest.read_manifest(model)["git_commit"] is None
