"""OpenAI-compatible server: python serve/server.py [model_dir=DIR] [server.port=8000]

Serves a trained model with its own retriever and prompt schema applied server-side:
/v1/chat/completions (streaming over SSE), /v1/models, /ask, /healthz. Binds 127.0.0.1
unless server.host says otherwise; RAGTUNE_API_KEY (or server.api_key) requires a Bearer key.
Same as ``ragtune serve``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("serve")
