"""Benchmark data prep: python train/prepare_squad.py SQUAD_JSON OUT_DIR [options]

Splits SQuAD v2 JSON BY ARTICLE into corpus documents (OUT_DIR/corpus/squad/<Title>.txt, and
OUT_DIR/corpus_train/ with the training articles only) and QA JSONL files (OUT_DIR/train.jsonl,
OUT_DIR/test.jsonl), so no test document is the source of any training question. A data tool,
so plain argparse rather than Hydra. Example:

    python train/prepare_squad.py ../shared/data/squad2-public/squad2-public.json \\
        outputs/data/squad --test-fraction 0.25 --max-train 400 --max-test 300
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.errors import RagtuneError  # noqa: E402
from ragtune.paths import resolve_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("squad_json", help="SQuAD v2 JSON file (relative paths: project root)")
    ap.add_argument("out_dir", help="output folder (relative paths: project root)")
    ap.add_argument("--test-fraction", type=float, default=0.25, help="share of ARTICLES held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=0, help="questions kept for training (0=all)")
    ap.add_argument("--max-test", type=int, default=0, help="questions kept for test (0=all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ragtune.qa import prepare_squad

    try:
        split = prepare_squad(
            resolve_path(args.squad_json),
            resolve_path(args.out_dir),
            test_fraction=args.test_fraction,
            seed=args.seed,
            max_train=args.max_train,
            max_test=args.max_test,
        )
    except RagtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(split.to_dict(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
