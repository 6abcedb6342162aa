"""One line per record of a bench/serve_load.py JSON-lines file, a wave's headline keys only.

python3 bench/serve_summary.py OUT/serve_load.jsonl     (the device pass scripts call it)
"""

import json
import sys

WAVE_KEYS = ("what", "clients_in", "prefill", "aggregate_tok_s", "wall_s", "latency_p50_s",
             "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "non_200", "steps", "prefill_runs",
             "shapes", "submit_s", "admit_s", "done_s", "peak_gib")  # fmt: skip

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for line in f:
            r = json.loads(line)
            r.pop("texts", None)
            if str(r.get("what", "")).startswith("wave"):
                r = {k: r[k] for k in WAVE_KEYS if k in r}
            print(json.dumps(r)[:1500])
