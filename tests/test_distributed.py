"""DDP through torchrun (issue 9.2): 2 CPU processes with gloo train the tiny model together.

Checks that training completes, the two ranks saw different examples, every rank ends with the
same LoRA weights, the saved adapter equals them, and only rank 0 writes the model folder and
the TensorBoard log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_WORKER = r"""
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, TrainerCallback
from trl.trainer import sft_trainer
import ragtune.train as rt
from ragtune.schema import get_schema
from test_train import make_cfg, make_examples

out, model = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
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

real_callbacks = rt._callbacks
rt._callbacks = lambda *a: [*real_callbacks(*a), DumpLora()]
tok = AutoTokenizer.from_pretrained(model)
ex = make_examples(tok, n=8)
r = rt.train(make_cfg(out, model, "train.max_steps=3", "train.save_steps=2",
                      "train.save_method=lora"), ex, get_schema("alpaca_rag"), out)
import torch.distributed as dist
(out / f"rank{rank}.json").write_text(json.dumps({
    "seen": seen, "steps": r.steps, "final_loss": r.final_loss,
    "world": dist.get_world_size() if dist.is_initialized() else 1,
    "backend": dist.get_backend() if dist.is_initialized() else None}))
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
    # epoch 1 = 2 steps x batch 2 x 2 ranks = all 8 examples: each rank got its own half
    # (the dataloader prefetches a batch ahead, so later entries belong to epoch 2)
    first0 = {tuple(s) for s in ranks[0]["seen"][:4]}
    first1 = {tuple(s) for s in ranks[1]["seen"][:4]}
    assert len(first0) == len(first1) == 4
    assert not first0 & first1
    assert len(first0 | first1) == 8

    lora0 = load_file(out / "rank0_lora.safetensors")
    lora1 = load_file(out / "rank1_lora.safetensors")
    saved = load_file(out / "model" / "adapter_model.safetensors")
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
