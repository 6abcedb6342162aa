"""The one prompt schema: every prompt ragtune renders, in training and in serving.

Training renders ``prompt + completion`` with :meth:`PromptSchema.render_example`; serving
renders the prompt with :meth:`PromptSchema.render_prompt`. Both go through the same
``_body`` code, so the text a model is trained on and the text it is asked with cannot
drift. Each variant (a YAML file in ``prompts/``) has a fingerprint, the hash of its
definition, which is stamped into the trained model's manifest and checked when serving.

The registry is litgpt-style: a name -> variant mapping read from ``prompts/``; the full
definition is also saved next to each checkpoint (``prompt_schema.json``) so a model keeps
its own template even if the repository's changes later.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ragtune.errors import RagtuneError
from ragtune.paths import PROMPTS_DIR, read_json_object

SCHEMA_FILE = "prompt_schema.json"
_SHARED = "schema.yaml"
_SECTIONS = ("instruction", "input", "context", "response")

# Control tokens of common model families. Retrieved text (and user text) must not be able
# to smuggle them in: the model would read them as turn boundaries or end of text.
_CONTROL_TOKEN = re.compile(
    r"<\|[^<>|\s]{1,40}\|>"  # <|im_start|>, <|eot_id|>, <|endoftext|>, ...
    r"|</?s>"  # Llama/Mistral BOS/EOS
    r"|\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_RESULTS)\]"  # Mistral control words
)
_LINE_HASHES = re.compile(r"(?m)^[ \t]*#{2,}[ \t]*")


class PromptError(RagtuneError, ValueError):
    """A prompt variant that does not exist or is malformed."""


@dataclass(frozen=True)
class PromptFields:
    """What a prompt is made of. ``context=None`` is closed book: no context section."""

    instruction: str
    input: str = ""
    context: Sequence[str] | None = None


@dataclass(frozen=True)
class PromptSchema:
    """One prompt variant: how the fields, the context and the answer are laid out."""

    name: str
    style: str  # "sections" (Alpaca-like plain text) or "chat" (the tokenizer's chat template)
    preamble: str
    rule: str
    headers: dict[str, str]
    abstain: str
    context_separator: str = "\n\n"
    instruction: str = ""  # generation variants (qa_gen): the fixed task in the instruction section
    extra: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- identity
    def definition(self) -> dict[str, Any]:
        """Everything that determines the rendered text (the fingerprint's input)."""
        d = asdict(self)
        d.pop("extra")
        if not d["instruction"]:  # answer variants have none; their fingerprints stay as they were
            d.pop("instruction")
        return d

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.definition(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def skeleton(self) -> str:
        """The template with placeholders, for manifests and for people to read."""
        body = self._body(PromptFields("{instruction}", "{input}", ["{context}"]))
        if self.style == "chat":
            return json.dumps(
                [{"role": "system", "content": self._system()}, {"role": "user", "content": body}],
                ensure_ascii=False,
            )
        return self._sections_prompt(body)

    # ----------------------------------------------------------------- rendering
    def render_prompt(self, fields: PromptFields, tokenizer: Any = None) -> str:
        """The text a model is asked with; ends right where the answer begins."""
        body = self._body(self._neutralised(fields, tokenizer))
        if self.style == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise PromptError(f"prompt '{self.name}' needs a tokenizer with a chat template")
            messages = [
                {"role": "system", "content": self._system()},
                {"role": "user", "content": body},
            ]
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return self._sections_prompt(body)

    def render_example(
        self, fields: PromptFields, response: str, tokenizer: Any
    ) -> tuple[str, str]:
        """A training example: (prompt, completion). The completion ends with EOS."""
        return self.render_prompt(fields, tokenizer), self.render_completion(response, tokenizer)

    def render_completion(self, response: str, tokenizer: Any) -> str:
        """The completion text a response trains as: stripped, EOS last."""
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise PromptError("the tokenizer has no EOS token; cannot end training completions")
        return response.strip() + eos

    def encode_prompt(self, tokenizer: Any, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, with exactly one BOS where the model expects one.

        Chat templates often write BOS themselves and tokenizers add another; the seed's
        template wrote ``<s>`` and let the tokenizer add a second one. Here the text is
        encoded without special tokens and BOS is prepended only if the tokenizer would add
        one and the text does not already start with it.
        """
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def context_budget(
        self, tokenizer: Any, fields: PromptFields, max_seq_length: int, answer_reserve: int = 64
    ) -> int:
        """Tokens left for the context block once the rest of the prompt and the answer fit.

        Training and serving both call this, so a context that fits in one fits in the other.
        """
        empty = PromptFields(fields.instruction, fields.input, [])
        used = len(self.encode_prompt(tokenizer, self.render_prompt(empty, tokenizer)))
        return max(0, max_seq_length - used - answer_reserve)

    @property
    def stop_strings(self) -> list[str]:
        """Text that must end generation: any section header means the answer is over."""
        return list(self.headers.values())

    def is_abstention(self, answer: str) -> bool:
        """Whether an answer is the schema's abstain answer (tolerant of case and apostrophes)."""
        norm = _loose(answer)
        target = _loose(self.abstain)
        return norm.startswith(target) or norm.startswith(_loose("I don't know"))

    # ----------------------------------------------------------------- safety
    def neutralise(self, text: str, tokenizer: Any = None) -> str:
        """Make untrusted text (retrieved chunks, user questions) unable to break the template.

        Section headers lose their ``###`` markup and the colon that makes them headers,
        line-leading ``##...`` runs are dropped, and control tokens (BOS/EOS, chat turn
        markers, every special or added token of ``tokenizer``) are removed. The words stay, so the
        content is still readable as content.
        """
        pattern = _special_pattern(tokenizer_specials(tokenizer))
        if pattern is not None:
            text = pattern.sub(" ", text)
        text = _CONTROL_TOKEN.sub(" ", text)
        for header in self.headers.values():
            word = header.strip("#: \t")
            text = re.sub(
                r"#*[ \t]*" + re.escape(word) + r"[ \t]*:", word + " -", text, flags=re.IGNORECASE
            )
        return _LINE_HASHES.sub("", text)

    # ----------------------------------------------------------------- internals
    def _neutralised(self, f: PromptFields, tokenizer: Any) -> PromptFields:
        ctx = None if f.context is None else [self.neutralise(c, tokenizer) for c in f.context]
        return PromptFields(
            self.neutralise(f.instruction, tokenizer), self.neutralise(f.input, tokenizer), ctx
        )

    def _fill(self, text: str) -> str:
        return text.format(context_header=self.headers["context"], abstain=self.abstain)

    def _system(self) -> str:
        return f"{self._fill(self.preamble)}\n\n{self._fill(self.rule)}"

    def _body(self, f: PromptFields) -> str:
        parts = [f"{self.headers['instruction']}\n{f.instruction.strip()}"]
        if f.input.strip():
            parts.append(f"{self.headers['input']}\n{f.input.strip()}")
        if f.context is not None:
            ctx = self.context_separator.join(c.strip() for c in f.context if c.strip())
            parts.append(f"{self.headers['context']}\n{ctx}")
        return "\n\n".join(parts)

    def _sections_prompt(self, body: str) -> str:
        return (
            f"{self._fill(self.preamble)}\n\n{body}\n\n{self._fill(self.rule)}\n\n"
            f"{self.headers['response']}\n"
        )

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write the full definition next to a checkpoint."""
        path = Path(directory) / SCHEMA_FILE
        payload = {"name": self.name, "fingerprint": self.fingerprint, **self.definition()}
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PromptSchema:
        """Read the definition a checkpoint was trained with."""
        path = Path(directory) / SCHEMA_FILE
        if not path.exists():
            raise PromptError(f"{path} not found: this folder was not written by ragtune")
        data = read_json_object(path, PromptError)
        recorded = data.pop("fingerprint", None)
        schema = _build(data, str(path))
        if recorded is None or recorded != schema.fingerprint:
            raise PromptError(
                f"{path}: its content hashes to {schema.fingerprint}, but it records "
                f"fingerprint {recorded!r}: the schema was edited after training"
            )
        return schema


def tokenizer_specials(tokenizer: Any) -> tuple[str, ...]:
    """Every token text the tokenizer maps to a control id: its special tokens and its added
    tokens (SmolLM2 has 17: ``<file_sep>``, ``<repo_name>``, ...), read from the tokenizer.

    Added tokens that are plain words or whitespace (some tokenizers add runs of spaces) are
    left alone: they carry no control meaning and removing them would change the text.
    """
    if tokenizer is None:
        return ()
    found = {t for t in getattr(tokenizer, "all_special_tokens", None) or [] if t}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in added.values():
        content = str(getattr(tok, "content", tok))
        if content.strip() and (getattr(tok, "special", False) or not _WORDLIKE.match(content)):
            found.add(content)
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


_WORDLIKE = re.compile(r"^[\s\w]+$")


@functools.lru_cache(maxsize=16)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern[str] | None:
    # longest first, so <|im_start|> is not cut into a shorter token's leftovers
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _adds_bos(tokenizer: Any) -> bool:
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}’‘]")


def _loose(text: str) -> str:
    return " ".join(_PUNCT.sub("", text.lower()).split())


def _build(data: dict[str, Any], where: str) -> PromptSchema:
    missing = [k for k in ("style", "preamble", "rule", "headers", "abstain") if k not in data]
    if missing:
        raise PromptError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("name", "style", "preamble", "rule", "abstain", "context_separator"):
        if key in data and not isinstance(data[key], str):
            raise PromptError(f"{where}: {key} must be a string")
    headers = data["headers"]
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise PromptError(f"{where}: headers must map each section to a string")
    if data["style"] not in ("sections", "chat"):
        raise PromptError(f"{where}: style must be 'sections' or 'chat', not {data['style']!r}")
    if set(data["headers"]) != set(_SECTIONS):
        raise PromptError(f"{where}: headers must be exactly {', '.join(_SECTIONS)}")
    known = {f.name for f in fields(PromptSchema)} - {"extra"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PromptError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return PromptSchema(**data)


def available(prompts_dir: Path = PROMPTS_DIR) -> list[str]:
    """Names of the prompt variants in the registry."""
    return sorted(p.stem for p in prompts_dir.glob("*.yaml") if p.name != _SHARED)


def get_schema(name: str, prompts_dir: Path = PROMPTS_DIR) -> PromptSchema:
    """Look a variant up by name in ``prompts/``, merged over the shared ``schema.yaml``."""
    path = prompts_dir / f"{name}.yaml"
    if name == Path(_SHARED).stem or not path.exists():
        raise PromptError(
            f"unknown prompt variant '{name}'; available: {', '.join(available(prompts_dir))}"
        )
    shared = yaml.safe_load((prompts_dir / _SHARED).read_text()) or {}
    variant = yaml.safe_load(path.read_text()) or {}
    return _build({**shared, **variant, "name": name}, str(path))
