"""Fit a trained model's answer-or-abstain decision on a validation evaluation and write it
into the model's manifest (ragtune.answerability.calibration_from_rows / write_calibration).

    python bench/squad_calibrate.py VAL_EVAL_DIR MODEL_DIR [--mode raft_rag]

VAL_EVAL_DIR is a train/eval.py run on the validation split (questions about documents held
out of training, never the test set); its answers.jsonl rows carry the features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--mode", default="raft_rag")
    args = ap.parse_args()
    from ragtune.answerability import calibration_from_rows, write_calibration

    rows = [json.loads(x) for x in (args.eval_dir / "answers.jsonl").open()]
    cal = calibration_from_rows([r for r in rows if r["mode"] == args.mode])
    write_calibration(args.model_dir, cal)
    print(json.dumps(cal.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
