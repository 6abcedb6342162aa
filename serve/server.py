"""OpenAI-compatible server: python serve/server.py [model_dir=DIR] [server.port=8000]

Serves a trained model with its own retriever and prompt schema applied server-side:
/v1/chat/completions (streaming over SSE), /v1/models, /ask, /healthz. Binds 127.0.0.1
unless server.host says otherwise; RAGTUNE_API_KEY (or server.api_key) requires a Bearer key.
"""

import os

# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other
# work, spinning made decoding ~10x slower (docs/benchmarks.md). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ragtune.config  # noqa: F401, E402  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="server")
def main(cfg: DictConfig) -> None:
    from ragtune.config import user_errors
    from ragtune.server import run_server

    user_errors(run_server)(cfg)


if __name__ == "__main__":
    main()
