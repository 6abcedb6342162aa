"""DDP through torchrun (issue 9.2): 2 CPU processes with gloo train the tiny model together.

Checks that the SFT dataset is built once (rank 0 ingests and builds, rank 1 loads rank 0's
saved examples from rank 0's run folder), training completes, the two ranks saw different
examples, every rank ends with the same LoRA weights, the saved adapter equals them, and only
rank 0 writes the model folder and the TensorBoard log. Fast tests: the saved-dataset
round trip, rank-0-only status files, and the FSDP settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.training.recipe import SFT_TOP_LEVEL

_WORKER = r"""
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, TrainerCallback
from trl.trainer import sft_trainer
import ragtune.training.checkpoints as ck
import ragtune.training.data as data
from ragtune.training.recipe import SFT_TOP_LEVEL, train
from ragtune.schema import get_schema
from test_train import make_cfg
from ragtune.config import compose, validate

out, model = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])

# the SFT stage's dataset, with a run folder per rank (Hydra names them by the second)
builds = []
real_build = data.build_dataset
def counting_build(cfg, run):
    builds.append(str(run))
    return real_build(cfg, run)
data.build_dataset = counting_build
data_cfg = compose("sft", [f"output_dir={out / f'sft{rank}'}", f"model.name_or_path={model}",
                           "model.max_seq_length=384", "retriever.chunk_size=400",
                           "retriever.chunk_overlap=40", "data.max_records=8"])
data_cfg = validate(data_cfg, top_level=SFT_TOP_LEVEL)
examples, stats, retriever, run = data.shared_dataset(data_cfg, Path(data_cfg.output_dir))
dataset = {"builds": builds, "run": str(run), "n": len(examples), "stats": stats,
           "examples": examples, "has_retriever": retriever is not None}
seen = []
real_call = sft_trainer.DataCollatorForLanguageModeling.torch_call

def recording_call(self, examples):
    seen.extend(list(map(int, ex["input_ids"])) for ex in examples)
    return real_call(self, examples)

sft_trainer.DataCollatorForLanguageModeling.torch_call = recording_call

class DumpLora(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        from peft import get_peft_model_state_dict
        sd = get_peft_model_state_dict(model.module if hasattr(model, "module") else model)
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                  str(out / f"rank{rank}_lora.safetensors"))

real_callbacks = ck.callbacks
ck.callbacks = lambda *a: [*real_callbacks(*a), DumpLora()]
tok = AutoTokenizer.from_pretrained(model)
train_cfg = make_cfg(out, model, "train.max_steps=3", "train.save_steps=2",
                     "train.save_method=lora", "model.max_seq_length=384")
schema = get_schema("alpaca_rag")
# every rank trains on the examples rank 0 built and shared, tokenized as training does
shared_ids, _ = data.tokenize_examples(examples, tok, schema, int(train_cfg.model.max_seq_length))
dataset["ids"] = [list(map(int, ids)) for ids in shared_ids["input_ids"]]
print(f"rank {rank}: {len(set(map(tuple, dataset['ids'])))} distinct examples", file=sys.stderr)
r = train(train_cfg, examples, schema, out)
import torch.distributed as dist
(out / f"rank{rank}.json").write_text(json.dumps({
    "seen": seen, "steps": r.steps, "final_loss": r.final_loss, "model_dir": str(r.model_dir),
    "world": dist.get_world_size() if dist.is_initialized() else 1,
    "backend": dist.get_backend() if dist.is_initialized() else None, "dataset": dataset}))
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes_gloo(tmp_path, tiny_lm_path):
    from safetensors.torch import load_file

    here = Path(__file__).resolve().parent
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]),
        "OMP_NUM_THREADS": "1",
        "RAGTUNE_OUTPUTS": str(tmp_path / "outputs"),  # the index goes there, not the repo
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run(
        [*cmd, str(script), str(out), tiny_lm_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["backend"] == "gloo" and r["steps"] == 3 for r in ranks)
    # the dataset was built once, by rank 0, and rank 1 trained on rank 0's saved examples
    d0, d1 = ranks[0]["dataset"], ranks[1]["dataset"]
    assert d0["builds"] == [str(out / "sft0")] and d1["builds"] == []
    assert d0["run"] == d1["run"] == str((out / "sft0").resolve())
    assert d0["has_retriever"] and not d1["has_retriever"]
    assert d0["n"] == d1["n"] == 8 and d0["examples"] == d1["examples"]
    assert d0["stats"] == d1["stats"]
    assert (out / "sft0" / "dataset" / "train.jsonl").exists()
    assert not (out / "sft1" / "dataset").exists()  # rank 1 neither built nor wrote one
    # epoch 1 = 2 steps x batch 2 x 2 ranks = all 8 examples: each rank got its own half
    # (the dataloader prefetches a batch ahead, so later entries belong to epoch 2)
    first0 = {tuple(s) for s in ranks[0]["seen"][:4]}
    first1 = {tuple(s) for s in ranks[1]["seen"][:4]}
    assert len({tuple(ids) for ids in d0["ids"]}) == 8, res.stderr[-2000:]
    assert len(first0) == len(first1) == 4
    assert not first0 & first1
    assert len(first0 | first1) == 8
    assert first0 | first1 == {tuple(ids) for ids in d0["ids"]}  # rank 0's shared examples

    lora0 = load_file(out / "rank0_lora.safetensors")
    lora1 = load_file(out / "rank1_lora.safetensors")
    # train() stages the model beside model/ (run_sft publishes it once the manifest is in)
    saved = load_file(Path(ranks[0]["model_dir"]) / "adapter_model.safetensors")
    assert set(saved) == set(lora0) == set(lora1)
    for k in saved:
        assert (saved[k] == lora0[k]).all(), k  # what rank 0 holds is what was saved
        assert (lora0[k] == lora1[k]).all(), k  # DDP kept the replicas identical
    # rank 0 alone writes the model folder and the TensorBoard log
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "ragtune-complete.json").exists() for c in ckpts)
    assert {p.name for p in ckpts[-1].glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }


# --------------------------------------------------------------------------- fast tests
def test_saved_dataset_round_trips(tmp_path):
    from ragtune.raft import load_saved_dataset, save_dataset

    examples = [
        {
            "kind": "oracle",
            "instruction": "Wer?",
            "prompt": "P 日本\n",
            "completion": "A",
            "x": [1],
        },
        {"kind": "abstain", "instruction": "Q2", "prompt": "P2", "completion": "B", "x": None},
    ]
    stats = {"examples": 2, "kinds": {"oracle": 1, "abstain": 1}, "tokens": {"mean": 3.5}}
    folder = save_dataset(examples, stats, tmp_path / "dataset", num_preview=1)
    assert load_saved_dataset(folder) == (examples, stats)
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        load_saved_dataset(tmp_path / "missing")


def test_other_ranks_write_no_manifest_or_latest(outputs, monkeypatch, tmp_path):
    import ragtune.training.data as data
    import ragtune.training.recipe as recipe
    from ragtune.config import compose

    cfg = compose("sft", [f"output_dir={tmp_path / 'run'}"])
    model_dir = tmp_path / "run" / "model"
    written = []
    result = recipe.TrainResult(model_dir=model_dir, final_loss=1.5)
    monkeypatch.setattr(data, "shared_dataset", lambda c, o: ([], {}, None, o))
    monkeypatch.setattr(recipe, "train", lambda *a, **k: result)
    monkeypatch.setattr(recipe, "_write_manifest", lambda *a: written.append(a))
    monkeypatch.setenv("RANK", "1")
    assert recipe.run_sft(cfg).metric == -1.5
    assert not written and not (outputs / "latest").exists()
    monkeypatch.setenv("RANK", "0")
    sft = recipe.run_sft(cfg)
    assert sft.metric == -1.5 and sft.model_dir == model_dir and sft.metrics is None
    assert written and (outputs / "latest").is_symlink()


def test_fsdp_is_off_by_default_and_translates_to_fsdp2(tmp_path):
    from ragtune.config import compose, validate
    from ragtune.training.distributed import fsdp_args
    from ragtune.training.trainer import sft_config as _sft_config

    precision = {"bf16": False, "fp16": False}
    cfg = validate(compose("sft", [f"output_dir={tmp_path}"]), top_level=SFT_TOP_LEVEL)
    assert cfg.train.fsdp == "" and fsdp_args(cfg) == {}
    assert not _sft_config(cfg, tmp_path, precision, cuda=False).fsdp

    cfg = validate(
        compose(
            "sft",
            [
                f"output_dir={tmp_path}",
                "train.fsdp='full_shard auto_wrap offload'",
                "train.gradient_checkpointing=true",
            ],
        ),
        top_level=SFT_TOP_LEVEL,
    )
    args = fsdp_args(cfg)
    assert args["fsdp"] is True
    assert args["fsdp_config"] == {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_offload": True,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": True,
    }
    sft_args = _sft_config(cfg, tmp_path, precision, cuda=False)
    assert sft_args.fsdp is True and not sft_args.gradient_checkpointing
    plugin = sft_args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["cpu_offload"] is True and plugin["activation_checkpointing"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    cfg = compose("sft", [f"output_dir={tmp_path}", "train.fsdp=shard_grad_op"])
    cfg = validate(cfg, top_level=SFT_TOP_LEVEL)
    assert fsdp_args(cfg)["fsdp_config"]["reshard_after_forward"] is False
    assert fsdp_args(cfg)["fsdp_config"]["auto_wrap_policy"] == "NO_WRAP"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.fsdp=full_sharding"], "unknown option"),
        (["train.fsdp='full_shard shard_grad_op'"], "choose one"),
        (["train.fsdp=full_shard", "train.backend=unsloth"], "train.backend=hf"),
    ],
)
def test_bad_fsdp_settings_are_refused_naming_the_key(tmp_path, overrides, message):
    from ragtune.config import ConfigError, compose, validate

    with pytest.raises(ConfigError, match="train.fsdp") as e:
        validate(compose("sft", [f"output_dir={tmp_path}", *overrides]), top_level=SFT_TOP_LEVEL)
    assert message in str(e.value)


def test_fsdp_with_merged_4bit_is_refused_before_any_model_loads(tmp_path, no_model_loads):
    from ragtune.config import compose
    from ragtune.training import TrainError
    from ragtune.training.recipe import train

    cfg = compose("sft", [f"output_dir={tmp_path}", "train.fsdp=full_shard", "train.backend=hf"])
    cfg.train.save_method = "merged_4bit"
    with pytest.raises(TrainError, match="train.fsdp"):
        train(cfg, [], None, tmp_path)
    assert no_model_loads == []


# --------------------------------------------------------------------------- the process group
_GROUP_WORKER = r"""
import json, os, sys, time
from pathlib import Path
import torch.distributed as dist
from ragtune.training import distributed as d

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
assert not dist.is_initialized()
started = d.init_distributed()
again = d.init_distributed()  # a second call finds the group running
world = d.world_size()
# each rank proposes its own path: rank 0's is the one every rank gets
chosen = d.broadcast_path(Path(f"/ckpt/from-rank-{rank}"), world)
nothing = d.broadcast_path(None if rank == 0 else Path("/ckpt/rank-1-only"), world)
if rank == 0:
    time.sleep(1.0)  # rank 1 reaches the barrier first and must wait for this file
    (out / "before-barrier").write_text("rank 0")
d.barrier(world)
saw = (out / "before-barrier").exists()
(out / f"group{rank}.json").write_text(json.dumps({
    "started": started, "again": again, "world": world, "backend": dist.get_backend(),
    "rank": dist.get_rank(), "chosen": str(chosen), "nothing": None if nothing is None else str(nothing),
    "saw_rank0_file": saw, "main": d.is_main_process(),
}))
dist.destroy_process_group()
"""


def test_two_processes_share_one_group_rank_zeros_path_and_a_barrier(tmp_path):
    """torchrun, 2 CPU processes, no model: the group, rank 0's decision and the barrier."""
    here = Path(__file__).resolve().parent
    script = tmp_path / "group.py"
    script.write_text(_GROUP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(here.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run(
        [*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"group{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert got["started"] is True and got["again"] is True
        assert got["world"] == 2 and got["backend"] == "gloo" and got["rank"] == r
        assert got["chosen"] == "/ckpt/from-rank-0"  # rank 0 decides
        assert got["nothing"] is None  # rank 0's "no checkpoint" reaches every rank
        assert got["saw_rank0_file"] is True  # the barrier held rank 1 until rank 0 came
    assert [got["main"] for got in ranks] == [True, False]


def test_a_plain_run_starts_no_group_and_keeps_its_path(monkeypatch):
    import torch.distributed as dist

    from ragtune.training import distributed as d

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert d.world_size() == 1 and d.is_main_process()
    assert d.init_distributed() is False and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1 starts no group either
    assert d.init_distributed() is False and not dist.is_initialized()
    path = Path("/ckpt/checkpoint-7")
    assert d.broadcast_path(path, 1) is path and d.broadcast_path(None, 1) is None
    d.barrier(1)  # no group, nothing to wait for


def test_the_group_waits_as_long_as_transformers_would():
    from transformers import TrainingArguments

    from ragtune.training.distributed import DDP_TIMEOUT_S

    assert TrainingArguments.__dataclass_fields__["ddp_timeout"].default == DDP_TIMEOUT_S


# --------------------------------------------------------------------------- FSDP gather
class _FakeAccelerator:
    def __init__(self, state):
        self.state = state
        self.gathered = 0

    def get_state_dict(self, model):
        self.gathered += 1
        return self.state


class _FakeTrainer:
    def __init__(self, state, rank0: bool):
        self.accelerator = _FakeAccelerator(state)
        self.model = object()
        self.rank0 = rank0

    def is_world_process_zero(self) -> bool:
        return self.rank0


def _lora_state(cfg, model_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.training.backends import lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora_config(cfg.train))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fsdp_gather_rebuilds_the_trained_lora_model_on_rank_zero(tmp_path, tiny_lm_path):
    import torch

    from ragtune.config import compose, validate
    from ragtune.training import TrainError
    from ragtune.training.distributed import gather_fsdp_model

    cfg = compose("sft", [f"output_dir={tmp_path}", f"model.name_or_path={tiny_lm_path}"])
    cfg = validate(cfg, top_level=SFT_TOP_LEVEL)
    state = _lora_state(cfg, tiny_lm_path)
    lora_b = next(k for k in state if "lora_B" in k)
    state[lora_b] = torch.full_like(state[lora_b], 0.25)  # what training changed

    trainer = _FakeTrainer(state, rank0=False)
    assert gather_fsdp_model(trainer, cfg, tiny_lm_path) is None
    assert trainer.accelerator.gathered == 1  # every rank joins the collective gather

    model = gather_fsdp_model(_FakeTrainer(state, rank0=True), cfg, tiny_lm_path)
    assert model is not None
    assert torch.equal(model.state_dict()[lora_b], state[lora_b])

    missing = {k: v for k, v in state.items() if k != lora_b}
    with pytest.raises(TrainError, match="1 LoRA weights missing"):
        gather_fsdp_model(_FakeTrainer(missing, rank0=True), cfg, tiny_lm_path)
    extra = {**state, "not.a.weight": torch.zeros(1)}
    with pytest.raises(TrainError, match="1 unexpected"):
        gather_fsdp_model(_FakeTrainer(extra, rank0=True), cfg, tiny_lm_path)
