"""A linear answerability probe on the fine-tuned model's hidden states (issue 17; measured,
not adopted).

Does the model *know* whether its context holds the answer, even where its output
probabilities (``ragtune.answerability`` FEATURES) do not show it? For every question of a
``bench/squad_cpu.sh`` run, the question is retrieved and rendered through the serving
pipeline (``RagPipeline.prepare``: the trained folder's own retriever settings and prompt),
one forward pass keeps the hidden state of every layer at the prompt's last token (and the
mean over the prompt), and a logistic probe (standardised, L2 strength by 5-fold CV) per layer,
plus the retrieval score, learns "answerable". Fitted on the calibration article the training
held out (``dataset/calibration.jsonl``: what the shipped decision is fitted on), on the
training articles (seen in training), or both; AUROC on the test articles::

    python bench/squad_probe.py /tmp/squad0   # the OUT of bench/squad_cpu.sh; ~20 min CPU

(the features are kept in ``OUT/probe/*.npz``; delete them to compute them again).

Results: docs/benchmarks.md, "More levers tried" (the probe).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from squad_abstain_prep import R  # noqa: E402  (bench/, this script's folder)

from ragtune.config import compose  # noqa: E402
from ragtune.qa import load_qa  # noqa: E402
from ragtune.rag import RagPipeline  # noqa: E402

# bench/squad_cpu.sh's serving settings (its R array; E adds the answer length)
SETTINGS = [*R, "generate.max_new_tokens=32"]


def hidden_states(run: Path, index: str, corpus: str, records: list, tag: str) -> dict:
    """Per question: hidden states (2 poolings x layers x width), label, best retrieval score;
    kept in ``RUN/probe/<tag>.npz`` (a rerun reads it instead of running the model again)."""
    cache = run / "probe" / f"{tag}.npz"
    if cache.exists():
        return dict(np.load(cache))
    where = [f"retriever.persist_dir={index}", f"data.corpus={corpus}", f"output_dir={run}/probe"]
    cfg = compose("eval", [*SETTINGS, *where])
    # the command line's keys win over the trained folder's manifest, as in train/eval.py: the
    # test questions are retrieved from the test corpus, not the training index it names
    explicit = [s.split("=")[0] for s in (*SETTINGS, *where)]
    # the test corpus is not the one the model was trained on: that is the point (as train/eval.py)
    pipe = RagPipeline.from_model_dir(run / "runs/raft/model", cfg, True, explicit=explicit)
    model = pipe.model.eval()
    feats, labels, retrieval = [], [], []
    t0 = time.time()
    for i, r in enumerate(records):
        prepared = pipe.prepare(r.instruction, r.input)
        ids = torch.tensor([pipe.generator.encode(prepared.prompt)])
        with torch.no_grad():
            layers = model(ids, output_hidden_states=True).hidden_states
        last = torch.stack([h[0, -1] for h in layers])
        mean = torch.stack([h[0].mean(0) for h in layers])
        feats.append(torch.stack([last, mean]).float().numpy())
        labels.append(int(r.answerable))
        retrieval.append(max([c.score or 0.0 for c in prepared.chunks] or [0.0]))
        if i % 100 == 0:
            print(f"{tag}: {i}/{len(records)} {time.time() - t0:.0f}s", flush=True)
    out = {"H": np.stack(feats), "y": np.array(labels), "r": np.array(retrieval)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def probe_auroc(fit: dict, test: dict, pool: int, layer: int) -> float:
    clf = make_pipeline(
        StandardScaler(), LogisticRegressionCV(Cs=[1e-4, 1e-3, 1e-2, 1e-1], cv=5, max_iter=2000)
    )
    clf.fit(np.c_[fit["H"][:, pool, layer], fit["r"]], fit["y"])
    scores = clf.predict_proba(np.c_[test["H"][:, pool, layer], test["r"]])[:, 1]
    return float(roc_auc_score(test["y"], scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the OUT folder of bench/squad_cpu.sh")
    ap.add_argument("--every", type=int, default=3, help="probe every n-th layer")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    run = args.run
    cal = load_qa(run / "runs/raft/dataset/calibration.jsonl")
    held_out = {r.source for r in cal}
    train = [r for r in load_qa(run / "train.jsonl") if r.source not in held_out]
    train_idx, train_corpus = f"{run}/index_train", f"{run}/corpus_train"
    test_records = load_qa(run / "test.jsonl")
    sets = {
        "calibration": hidden_states(run, train_idx, train_corpus, cal, "cal"),
        "train": hidden_states(run, train_idx, train_corpus, train, "train"),
        "test": hidden_states(run, f"{run}/index_all", f"{run}/corpus", test_records, "test"),
    }
    sets["train+calibration"] = {
        k: np.concatenate([sets["train"][k], sets["calibration"][k]]) for k in ("H", "y", "r")
    }
    test = sets["test"]
    report = {"retrieval_auroc": float(roc_auc_score(test["y"], test["r"])), "probes": []}
    print(
        f"test: {len(test['y'])} questions, retrieval alone AUROC {report['retrieval_auroc']:.3f}"
    )
    for fit in ("calibration", "train", "train+calibration"):
        for pool, pool_name in ((0, "last token"), (1, "mean")):
            layers = range(0, test["H"].shape[2], args.every)
            row = {layer: round(probe_auroc(sets[fit], test, pool, layer), 3) for layer in layers}
            report["probes"].append({"fit": fit, "pool": pool_name, "auroc_by_layer": row})
            print(f"fit on {fit:<17} {pool_name:<10} test AUROC by layer {row}", flush=True)
    (run / "probe.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
