"""QA records: Alpaca-style JSONL (or a JSON list) and SQuAD v2 JSON, into ``QARecord``s.

SQuAD articles double as corpus documents (``squad_documents``), and ``prepare_squad``
splits a SQuAD file BY ARTICLE into train/test QA files plus corpus folders, so the test
documents are never seen in training.

Bad input policy: by default (``on_error="raise"``) the first bad record stops loading with a
:class:`QAFormatError` naming the file and the line (JSONL), item (JSON list) or question id /
article (SQuAD): a silently dropped record would change a benchmark without anyone noticing.
``on_error="skip"`` instead skips single bad records, logs one warning each, and appends the
messages to ``problems`` when a list is given. A file that cannot be read or parsed at all
(missing, not JSON, no SQuAD ``data`` list) is always fatal.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.types import QARecord

log = logging.getLogger(__name__)

SQUAD_DIR = "squad"  # corpus-relative folder of SQuAD article documents
ON_ERROR = ("raise", "skip")


class QAFormatError(RagtuneError, ValueError):
    """A QA file (JSONL, JSON list or SQuAD v2) that cannot be used; names file and record."""


# --------------------------------------------------------------------------- public API
def load_qa(
    path: str | Path,
    *,
    on_error: str = "raise",
    problems: list[str] | None = None,
) -> list[QARecord]:
    """Read QA records from JSONL, a JSON list of records, or SQuAD v2 JSON.

    The format is detected from the content (a JSON object with a ``data`` list is SQuAD;
    a JSON array is a list of records; anything else is read as JSONL), so the extension
    does not matter. JSONL records without an ``id`` get ``<file stem>:<line>``.
    SQuAD questions become ``QARecord(instruction=question, output=first answer or "" when
    impossible, source=squad/<Title>.txt, id=qid, answers=all answer texts)``.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    p = Path(path)
    text = _read_text(p)
    sink = _Problems(p, on_error, problems)
    kind, data = _detect(p, text)
    if kind == "squad":
        records = list(_squad_records(p, data, sink))
    elif kind == "list":
        records = list(_list_records(p, data, sink))
    else:
        records = list(_jsonl_records(p, text, sink))
    records = _dedup_ids(p, records, sink)
    if not records:
        raise QAFormatError(f"{p}: no QA records found")
    n_ans = sum(r.answerable for r in records)
    log.info(
        "loaded %d QA records from %s (%s): %d answerable, %d unanswerable%s",
        len(records),
        p,
        kind,
        n_ans,
        len(records) - n_ans,
        f", {sink.count} skipped" if sink.count else "",
    )
    return records


def is_squad(path: str | Path) -> bool:
    """True when the file is SQuAD JSON (an object with a ``data`` list of articles)."""
    p = Path(path)
    return _detect(p, _read_text(p))[0] == "squad"


def squad_documents(path: str | Path) -> list[tuple[str, str]]:
    """Each SQuAD article as one corpus document: ``(squad/<Title>.txt, paragraphs)``.

    The text is the article's paragraph contexts joined by blank lines, in file order. The
    relative path is what ``load_qa`` puts into ``QARecord.source`` for the article's questions.
    """
    p = Path(path)
    data = _squad_data(p)
    return [(a.source, a.text) for a in _articles(p, data)]


@dataclass(frozen=True)
class SquadSplit:
    """What ``prepare_squad`` wrote: file paths and counts, for logs and manifests."""

    out_dir: Path
    corpus: Path  # every article: the index served and evaluated on
    corpus_train: Path  # training articles only: an index that never holds a test document
    train: Path
    test: Path
    train_articles: list[str]
    test_articles: list[str]
    n_train: int
    n_test: int
    n_train_unanswerable: int
    n_test_unanswerable: int

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def prepare_squad(
    path: str | Path,
    out_dir: str | Path,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    max_train: int = 0,
    max_test: int = 0,
) -> SquadSplit:
    """Split SQuAD v2 JSON by article into corpus documents and train/test QA JSONL.

    Writes under ``out_dir``: ``corpus/squad/<Title>.txt`` (all articles: the index to serve
    and evaluate on), ``corpus_train/squad/<Title>.txt`` (training articles only: index this
    for training when even distractor contexts must not come from test articles),
    ``train.jsonl``, ``test.jsonl`` and ``split.json``. Whole articles go to one side, so no
    test question's document is the source of any training record. ``max_train`` /
    ``max_test`` (0 = all) sample that many questions with the seed, keeping the share of
    unanswerable questions.
    """
    if not 0.0 < test_fraction < 1.0:
        raise QAFormatError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_train < 0 or max_test < 0:
        raise QAFormatError("max_train and max_test must be >= 0 (0 = all)")
    p = Path(path)
    articles = _articles(p, _squad_data(p))
    if len(articles) < 2:
        raise QAFormatError(
            f"{p}: need at least 2 articles to split by article, got {len(articles)}"
        )
    records = load_qa(p)
    by_source: dict[str, list[QARecord]] = {}
    for r in records:
        by_source.setdefault(r.source or "", []).append(r)

    order = [a.source for a in articles]
    random.Random(seed).shuffle(order)
    n_test = min(len(order) - 1, max(1, round(len(order) * test_fraction)))
    test_sources = set(order[:n_test])
    train = [
        r for a in articles if a.source not in test_sources for r in by_source.get(a.source, [])
    ]
    test = [r for a in articles if a.source in test_sources for r in by_source.get(a.source, [])]
    train = sample_records(train, max_train, seed)
    test = sample_records(test, max_test, seed + 1)

    out = Path(out_dir)
    corpus, corpus_train = out / "corpus", out / "corpus_train"
    for a in articles:
        _write(corpus / a.source, a.text)
        if a.source not in test_sources:
            _write(corpus_train / a.source, a.text)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "test.jsonl", test)
    split = SquadSplit(
        out_dir=out,
        corpus=corpus,
        corpus_train=corpus_train,
        train=out / "train.jsonl",
        test=out / "test.jsonl",
        train_articles=[a.source for a in articles if a.source not in test_sources],
        test_articles=[a.source for a in articles if a.source in test_sources],
        n_train=len(train),
        n_test=len(test),
        n_train_unanswerable=sum(not r.answerable for r in train),
        n_test_unanswerable=sum(not r.answerable for r in test),
    )
    meta = split.to_dict() | {
        "squad_file": str(p),
        "test_fraction": test_fraction,
        "seed": seed,
        "max_train": max_train,
        "max_test": max_test,
    }
    _write(out / "split.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "SQuAD split by article: train %d questions (%d unanswerable) from %d articles, "
        "test %d questions (%d unanswerable) from %d articles -> %s",
        split.n_train,
        split.n_train_unanswerable,
        len(split.train_articles),
        split.n_test,
        split.n_test_unanswerable,
        len(split.test_articles),
        out,
    )
    return split


def record_to_json(r: QARecord) -> dict[str, Any]:
    """The JSONL form of a record (what ``load_qa`` reads back to an equal record)."""
    d: dict[str, Any] = {"instruction": r.instruction, "input": r.input, "output": r.output}
    if r.source is not None:
        d["source"] = r.source
    if r.id is not None:
        d["id"] = r.id
    if r.answers:
        d["answers"] = list(r.answers)
    if r.plausible:
        d["plausible_answer"] = r.plausible
    return d


def gold_answers(r: QARecord) -> tuple[str, ...]:
    """All acceptable answers of a record (SQuAD has several); ``()`` when unanswerable."""
    if not r.answerable:
        return ()
    extra = tuple(a for a in r.answers if a.strip())
    return extra if r.output in extra else (r.output, *extra)


# --------------------------------------------------------------------------- internals
class _Problems:
    """Raise (strict) or collect-and-warn (skip) for one bad record."""

    def __init__(self, path: Path, on_error: str, problems: list[str] | None):
        self.path, self.on_error, self.problems, self.count = path, on_error, problems, 0

    def __call__(self, where: str, msg: str) -> None:
        text = f"{self.path}: {where}: {msg}"
        if self.on_error == "raise":
            raise QAFormatError(text + " (on_error='skip' skips bad records)")
        self.count += 1
        log.warning("skipping bad QA record: %s", text)
        if self.problems is not None:
            self.problems.append(text)


def _read_text(p: Path) -> str:
    if not p.is_file():
        raise QAFormatError(f"{p}: QA file not found")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise QAFormatError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _detect(p: Path, text: str) -> tuple[str, Any]:
    """('squad', data) | ('list', items) | ('jsonl', None)."""
    head = text.lstrip()[:1]
    whole: Any = None
    if head in "{[" and head:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            # One JSON object per line fails as a whole document: that is JSONL.
            if head == "[" or (p.suffix.lower() == ".json" and "\n{" not in text.strip()):
                raise QAFormatError(f"{p}: not valid JSON: {e.msg} at line {e.lineno}") from None
            return "jsonl", None
    if isinstance(whole, dict) and "data" in whole:
        if not isinstance(whole["data"], list):
            raise QAFormatError(f"{p}: SQuAD 'data' must be a list of articles")
        return "squad", whole
    if isinstance(whole, list):
        return "list", whole
    if isinstance(whole, dict) and p.suffix.lower() == ".json" and "instruction" not in whole:
        raise QAFormatError(
            f"{p}: JSON object without a 'data' list: not SQuAD v2; "
            "QA files are SQuAD JSON, a JSON list of records, or JSONL"
        )
    return "jsonl", None


def _squad_data(p: Path) -> dict[str, Any]:
    kind, data = _detect(p, _read_text(p))
    if kind != "squad":
        raise QAFormatError(f"{p}: not a SQuAD JSON file (an object with a 'data' list)")
    return data


def _jsonl_records(p: Path, text: str, bad: _Problems) -> Iterator[QARecord]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"line {lineno}", f"not valid JSON ({e.msg})")
            continue
        rec = _record(obj, f"line {lineno}", f"{p.stem}:{lineno}", bad)
        if rec is not None:
            yield rec


def _list_records(p: Path, items: list[Any], bad: _Problems) -> Iterator[QARecord]:
    for i, obj in enumerate(items):
        rec = _record(obj, f"item {i}", f"{p.stem}:{i}", bad)
        if rec is not None:
            yield rec


def _record(obj: Any, where: str, default_id: str, bad: _Problems) -> QARecord | None:
    if not isinstance(obj, dict):
        bad(where, f"expected a JSON object, got {type(obj).__name__}")
        return None
    instr = obj.get("instruction")
    if not isinstance(instr, str) or not instr.strip():
        bad(where, "'instruction' must be a non-empty string")
        return None
    fields: dict[str, Any] = {}
    for key in ("input", "output"):
        v = obj.get(key)
        if v is None:
            v = ""
        if not isinstance(v, str):
            bad(where, f"'{key}' must be a string, got {type(v).__name__}")
            return None
        fields[key] = v
    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        bad(where, f"'source' must be a string, got {type(source).__name__}")
        return None
    rid = obj.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        bad(where, f"'id' must be a string or integer, got {type(rid).__name__}")
        return None
    answers = obj.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        bad(where, "'answers' must be a list of strings")
        return None
    if answers and not fields["output"].strip():
        bad(where, "'answers' given but 'output' is empty (empty output = unanswerable)")
        return None
    plausible = obj.get("plausible_answer") or ""
    if not isinstance(plausible, str):
        bad(where, f"'plausible_answer' must be a string, got {type(plausible).__name__}")
        return None
    return _make(
        instruction=instr,
        input=fields["input"],
        output=fields["output"],
        source=source or None,
        id=str(rid),
        answers=answers,
        plausible="" if fields["output"].strip() else plausible.strip(),
    )


@dataclass(frozen=True)
class _Article:
    title: str
    source: str
    text: str
    paragraphs: list[dict[str, Any]]


def _articles(p: Path, data: dict[str, Any]) -> list[_Article]:
    """Validated articles with unique corpus paths (structural problems are always fatal)."""
    out: list[_Article] = []
    used: set[str] = set()
    for i, art in enumerate(data["data"]):
        where = f"article {i}"
        if not isinstance(art, dict):
            raise QAFormatError(f"{p}: {where}: expected an object, got {type(art).__name__}")
        title = art.get("title")
        if not isinstance(title, str) or not title.strip():
            raise QAFormatError(f"{p}: {where}: 'title' must be a non-empty string")
        where = f"article {i} ({title!r})"
        paras = art.get("paragraphs")
        if not isinstance(paras, list):
            raise QAFormatError(f"{p}: {where}: 'paragraphs' must be a list")
        contexts = []
        for j, para in enumerate(paras):
            ctx = para.get("context") if isinstance(para, dict) else None
            if not isinstance(ctx, str):
                raise QAFormatError(f"{p}: {where}, paragraph {j}: 'context' must be a string")
            if not isinstance(para.get("qas", []), list):
                raise QAFormatError(f"{p}: {where}, paragraph {j}: 'qas' must be a list")
            contexts.append(ctx.strip())
        source = _unique_source(title, used)
        out.append(_Article(title, source, "\n\n".join(c for c in contexts if c), paras))
    return out


def _unique_source(title: str, used: set[str]) -> str:
    stem = re.sub(r"[^\w.\-]+", "_", title.strip(), flags=re.UNICODE).strip("._") or "article"
    name, n = stem, 2
    while name.lower() in used:  # case-insensitive file systems
        name, n = f"{stem}_{n}", n + 1
    used.add(name.lower())
    return f"{SQUAD_DIR}/{name}.txt"


def _squad_records(p: Path, data: dict[str, Any], bad: _Problems) -> Iterator[QARecord]:
    for art in _articles(p, data):
        for j, para in enumerate(art.paragraphs):
            for k, qa in enumerate(para.get("qas", [])):
                qid = qa.get("id") if isinstance(qa, dict) else None
                where = (
                    f"question id {qid!r}"
                    if isinstance(qid, str) and qid
                    else f"article {art.title!r}, paragraph {j}, question {k}"
                )
                rec = _squad_record(qa, where, art.source, bad)
                if rec is not None:
                    yield rec


def _squad_record(qa: Any, where: str, source: str, bad: _Problems) -> QARecord | None:
    if not isinstance(qa, dict):
        bad(where, f"expected an object, got {type(qa).__name__}")
        return None
    qid, question = qa.get("id"), qa.get("question")
    if not isinstance(qid, str) or not qid:
        bad(where, "'id' must be a non-empty string")
        return None
    if not isinstance(question, str) or not question.strip():
        bad(where, "'question' must be a non-empty string")
        return None
    answers = qa.get("answers", [])
    if not isinstance(answers, list):
        bad(where, "'answers' must be a list")
        return None
    texts: list[str] = []
    for a in answers:
        t = a.get("text") if isinstance(a, dict) else None
        if not isinstance(t, str):
            bad(where, f"each answer must be an object with a string 'text', got {a!r:.60}")
            return None
        texts.append(t)
    impossible = qa.get("is_impossible", not texts)  # SQuAD v1 files have no is_impossible
    if not isinstance(impossible, bool):
        bad(where, f"'is_impossible' must be true or false, got {impossible!r}")
        return None
    texts = [t for t in dict.fromkeys(t.strip() for t in texts) if t]
    plausible = ""
    if impossible:
        texts = []
        first = (qa.get("plausible_answers") or [{}])[0]
        plausible = first.get("text", "") if isinstance(first, dict) else ""
        plausible = plausible.strip() if isinstance(plausible, str) else ""
    elif not texts:
        bad(where, "answerable question (is_impossible false) without a non-empty answer text")
        return None
    return _make(
        instruction=question.strip(),
        output=texts[0] if texts else "",
        source=source,
        id=qid,
        answers=texts,
        plausible=plausible,
    )


def _make(*, answers: Iterable[str], **kw: Any) -> QARecord:
    """A QARecord carrying all gold answers (deduplicated, in order)."""
    return QARecord(answers=tuple(dict.fromkeys(a for a in answers if a.strip())), **kw)


def _dedup_ids(p: Path, records: list[QARecord], bad: _Problems) -> list[QARecord]:
    seen: set[str] = set()
    out = []
    for r in records:
        if r.id is not None and r.id in seen:
            bad(f"id {r.id!r}", "duplicate id (ids name answers in evaluation output)")
            continue
        if r.id is not None:
            seen.add(r.id)
        out.append(r)
    return out


def sample_records(records: list[QARecord], n: int, seed: int) -> list[QARecord]:
    """``n`` records (0 = all) in file order, keeping the unanswerable share; seeded."""
    if n <= 0 or n >= len(records):
        return records
    rng = random.Random(seed)
    unans = [i for i, r in enumerate(records) if not r.answerable]
    ans = [i for i, r in enumerate(records) if r.answerable]
    n_un = min(len(unans), round(n * len(unans) / len(records)))
    n_an = min(len(ans), n - n_un)
    n_un = n - n_an
    keep = set(rng.sample(unans, n_un)) | set(rng.sample(ans, n_an))
    return [r for i, r in enumerate(records) if i in keep]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_jsonl(path: Path, records: list[QARecord]) -> None:
    lines = (json.dumps(record_to_json(r), ensure_ascii=False) for r in records)
    _write(path, "".join(line + "\n" for line in lines))


def sources_not_in(records: list[QARecord], indexed: set[str]) -> tuple[list[str], int]:
    """QA source documents missing from an index: (missing, distinct sources named).

    Records without a ``source`` are not counted (nothing to check).
    """
    named = sorted({r.source for r in records if r.source})
    return [s for s in named if s not in indexed], len(named)
