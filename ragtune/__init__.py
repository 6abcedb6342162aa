"""ragtune: fine-tune and RAG as one design.

One prompt schema (``ragtune.schema`` over ``prompts/``) and one retriever render and fetch
every prompt, in training and in serving, so the two cannot drift apart.
"""

__version__ = "0.1.0"
