"""Refit a finished run's answer-or-abstain decision with today's code, into a copy of its model.

The run's own settings (``<run>/.hydra/config.yaml``), held-out questions
(``<run>/dataset/calibration.jsonl``) and training index are used, exactly as training's last
step does (``ragtune.training.calibration.calibrate``); nothing is retrained and the run's
model folder is left as it is. Evaluate the copy with ``train/eval.py
"eval.modes=[raft_rag]" eval.models.raft_rag=<copy> ...`` (docs/benchmarks.md, issue 17).

    python bench/refit_calibration.py /tmp/squad1/runs/raft /tmp/cal1/model
    python bench/refit_calibration.py RUN COPY --set retriever.reader_rerank=6 \
        --set "raft.calibration_features=[abstain_logodds,retrieval,abstain_logodds_chunk]"

``--set KEY=VALUE`` changes the run's settings for the refit; a ``retriever.*`` key is also
written into the copy's manifest, so the copy serves (and is evaluated) with the setting its
decision was fitted under.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.answerability import write_calibration  # noqa: E402
from ragtune.schema import get_schema  # noqa: E402
from ragtune.training.calibration import calibrate  # noqa: E402
from ragtune.training.data import load_tokenizer, open_retriever  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a train/sft.py run folder (hydra.run.dir)")
    ap.add_argument("copy", type=Path, help="where the model is copied and the decision written")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    sets = OmegaConf.from_dotlist(args.set)
    cfg = OmegaConf.merge(cfg, sets)
    if not args.copy.exists():
        shutil.copytree(args.run / "model", args.copy)
    manifest_path = args.copy / "manifest.json"
    if "retriever" in sets:  # the copy serves with what its decision is fitted under
        manifest = json.loads(manifest_path.read_text())
        manifest["retriever"].update(OmegaConf.to_container(sets.retriever))
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    retriever = open_retriever(cfg, load_tokenizer(cfg), ingest_corpus=False)
    cal = calibrate(cfg, get_schema(cfg.prompt.name), args.copy, retriever, args.run)
    if cal is not None:
        write_calibration(args.copy, cal)
    print(json.dumps(None if cal is None else cal.to_dict()))


if __name__ == "__main__":
    main()
