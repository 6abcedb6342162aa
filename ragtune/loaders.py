"""Corpus loading: find the documents under a corpus root safely and decode them to text.

Each supported file becomes one or more :class:`LoadedDoc` (a JSONL file gives one per
record). Anything that cannot be loaded raises :class:`SkipFile` with a reason a user can
act on; the ingest records it, warns naming the file and goes on with the rest.

Encoding detection is our own thin layer: charset-normalizer alone guesses short Shift_JIS
text as Korean (cp949) and Latin-1 as Baltic (cp1257), so we try the encodings this project
expects first (BOMs, UTF-8, UTF-16, Shift_JIS/CP932, EUC-JP, Latin-1/CP1252), each checked
for plausibility, and only then fall back to charset-normalizer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".jsonl", ".pdf"}


class SkipFile(Exception):
    """A file (or a part of it) that is not ingested; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class LoadedDoc:
    """Decoded text of one document (or one JSONL record) with its metadata."""

    text: str
    source: str  # corpus-relative POSIX path
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadResult:
    docs: list[LoadedDoc]
    warnings: list[str] = field(default_factory=list)  # partial problems (bad JSONL lines)
    encoding: str | None = None


# --------------------------------------------------------------------------- discovery
def safe_relpath(rel: str) -> str:
    """Check a corpus-relative path: POSIX, relative, no ``..`` or empty components.

    Raises :class:`SkipFile`. Used for every path found by the walk, so a source name in
    the index can never point outside the corpus.
    """
    if not rel:
        raise SkipFile("empty path")
    parts = rel.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise SkipFile("path contains '..' or is not relative to the corpus root")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipFile("file name is not valid UTF-8") from None
    if any(unicodedata.category(ch) == "Cc" for ch in rel):
        raise SkipFile("file name contains control characters")
    return rel


def discover(root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """All candidate files under ``root``: ``([(relpath, path)], [(relpath, skip reason)])``.

    Follows symlinks only while they stay inside the corpus root (a link that leaves it is
    refused); directory symlink loops are detected by real path and reported once. Hidden
    files and folders (``.git``, ``.DS_Store``) are ignored silently; files with an
    unsupported suffix are reported as skipped. Sorted by relative path, so ingest order is
    stable.
    """
    root = Path(root)
    real_root = root.resolve()
    files: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    seen_dirs: set[str] = {str(real_root)}

    def rel_of(path: Path) -> str:
        return path.relative_to(root).as_posix()

    def inside(real: Path) -> bool:
        return real == real_root or real_root in real.parents

    def walk(d: Path) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel_of(d), f"cannot list folder: {e.strerror or e}"))
            return
        for entry in entries:
            path = Path(entry.path)
            rel = rel_of(path)
            if entry.name.startswith("."):
                log.debug("ignoring hidden %s", rel)
                continue
            try:
                safe_relpath(rel)
            except SkipFile as e:
                skipped.append((_printable(rel), e.reason))
                continue
            try:
                is_link = entry.is_symlink()
                if is_link:
                    try:
                        real = path.resolve(strict=False)
                    except (OSError, RuntimeError):
                        skipped.append((rel, "symlink loop"))
                        continue
                    if not inside(real):
                        skipped.append((rel, f"symlink leaves the corpus root (-> {real})"))
                        continue
                    try:
                        path.resolve(strict=True)
                    except (OSError, RuntimeError):
                        skipped.append((rel, "broken symlink or symlink loop"))
                        continue
                else:
                    real = path
                if entry.is_dir(follow_symlinks=True):
                    key = str(path.resolve())
                    if key in seen_dirs:
                        skipped.append((rel, "symlink loop (folder already visited)"))
                        continue
                    seen_dirs.add(key)
                    walk(path)
                elif entry.is_file(follow_symlinks=True):
                    if path.suffix.lower() not in SUFFIXES:
                        skipped.append((rel, f"unsupported file type '{path.suffix or '(none)'}'"))
                        continue
                    files.append((rel, path))
                else:
                    skipped.append((rel, "not a regular file"))
            except OSError as e:
                skipped.append((rel, f"cannot stat: {e.strerror or e}"))

    walk(root)
    files.sort(key=lambda t: t[0])
    return files, skipped


def _printable(s: str) -> str:
    """A path safe to print: undecodable bytes and control characters escaped."""
    s = os.fsencode(s).decode("utf-8", "backslashreplace")
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) == "Cc" else ch for ch in s)


# --------------------------------------------------------------------------- decoding
_BOMS = [
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
]
TRUNCATED_UTF8 = "utf-8 (truncated)"
_KANA = re.compile(r"[\u3040-\u30ff]")
_HALFWIDTH_KANA = re.compile(r"[\uff61-\uff9f]")
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]")


def _control_ratio(text: str) -> float:
    if not text:
        return 0.0
    bad = sum(
        1
        for ch in text
        if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch not in "\t\n\r\f\v"
    )
    return bad / len(text)


def _japanese_plausible(text: str) -> bool:
    """Decoded Japanese looks real: has kana, few half-width kana, no control characters."""
    cjk = len(_CJK.findall(text))
    if not _KANA.search(text) or cjk == 0:
        return False
    return len(_HALFWIDTH_KANA.findall(text)) <= 0.02 * cjk and _control_ratio(text) < 0.001


def _utf8_mixed(data: bytes) -> str | None:
    """A reason string when some lines are valid UTF-8 text and others are not."""
    good = bad = 0
    first_bad = None
    offset = 0
    for line in data.split(b"\n"):
        try:
            s = line.decode("utf-8")
            if any(ord(ch) > 127 for ch in s) and len(s.strip()) >= 3:
                good += 1
        except UnicodeDecodeError as e:
            bad += 1
            if first_bad is None:
                first_bad = offset + e.start
        offset += len(line) + 1
    if good and bad:
        return (
            f"mixed encodings: {good} line(s) are UTF-8 but {bad} are not "
            f"(first invalid byte at offset {first_bad}); re-save the file in one encoding"
        )
    return None


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Bytes -> (text, encoding name). Raises :class:`SkipFile` for binary/undecodable data."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                body = data if enc == "utf-8-sig" else data[len(bom) :]
                return _finish(body.decode(enc), enc)
            except UnicodeDecodeError as e:
                raise SkipFile(
                    f"has a {enc} byte-order mark but is not valid {enc}: {e.reason}"
                ) from None
    if b"\x00" in data:
        # UTF-16 without BOM: every other byte is 0 for ASCII-range text.
        even, odd = data[0::2], data[1::2]
        for enc, zeros in (("utf-16-le", odd), ("utf-16-be", even)):
            if len(data) % 2 == 0 and zeros.count(0) > 0.6 * len(zeros):
                try:
                    return _finish(data.decode(enc), enc)
                except (UnicodeDecodeError, SkipFile):
                    pass
        raise SkipFile("binary file (contains NUL bytes)")
    try:
        return _finish(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError as e:
        utf8_error = e
    if utf8_error.end == len(data) and utf8_error.start >= len(data) - 3:
        try:  # a UTF-8 file cut off inside its last character (a truncated download)
            return _finish(data[: utf8_error.start].decode("utf-8"), TRUNCATED_UTF8)
        except UnicodeDecodeError:
            pass
    for enc in ("cp932", "euc_jp"):
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if _japanese_plausible(text):
            return _finish(text, enc)
    mixed = _utf8_mixed(data)
    if mixed:
        raise SkipFile(mixed)
    not_utf8 = f"not valid UTF-8 (byte 0x{data[utf8_error.start]:02x} at offset {utf8_error.start})"
    guesses: list[tuple[float, str, str]] = []
    try:
        text = data.decode("cp1252")
        if _control_ratio(text) < 0.01 and _mostly_latin(text):
            confidence = guess_confidence(text)
            if confidence >= GUESS_CONFIDENCE:
                return _finish(text, "cp1252")
            guesses.append((confidence, "cp1252", text))
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is not None and best.encoding:
        text = str(best)
        confidence = guess_confidence(text)
        if confidence >= GUESS_CONFIDENCE:
            return _finish(text, f"{best.encoding} ({GUESSED})")
        guesses.append((confidence, best.encoding, text))
    if guesses:
        confidence, enc, _ = max(guesses)
        raise SkipFile(
            f"{not_utf8}; the best guess, {enc}, is below the confidence bar "
            f"({confidence:.2f} < {GUESS_CONFIDENCE}) and would ingest garbled text: "
            "re-save the file as UTF-8"
        )
    raise SkipFile(f"{not_utf8} and no other encoding fits: binary or unknown encoding")


# A single-byte decoding of bytes that are not UTF-8 is a guess; below this share of
# plausible non-ASCII letters it is garbled text (mojibake), not the document.
GUESS_CONFIDENCE = 0.8
GUESSED = "guessed"
_WORD = re.compile(r"[^\W\d_]+")


def _script(ch: str) -> str:
    return unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]


def guess_confidence(text: str) -> float:
    """How plausible a guessed decoding is (0..1): the share of its non-ASCII letters that sit
    where real text puts them.

    An accented Latin letter belongs inside a word that also has ASCII letters (``café``) or
    is a one-letter word (``à``); a letter of another script belongs to a document mostly
    written in that script. Words made only of accented letters (``ÿþú``, or ``Ïðèâåò``,
    Cyrillic read as cp1252) and stray letters of another script are what mojibake looks like.
    """
    words = _WORD.findall(text)
    n_letters = sum(len(w) for w in words)
    latin_ok = 0
    other: dict[str, int] = {}
    for w in words:
        has_ascii = any(ord(ch) < 128 for ch in w)
        for ch in w:
            if ord(ch) < 128:
                continue
            script = _script(ch)
            if script != "LATIN":
                other[script] = other.get(script, 0) + 1
            elif has_ascii or len(w) == 1:
                latin_ok += 1
    n_foreign = sum(1 for w in words for ch in w if ord(ch) > 127)
    if not n_foreign:
        return 1.0
    dominant = max(other.values(), default=0)
    other_ok = dominant if dominant >= 0.5 * n_letters else 0
    return (latin_ok + other_ok) / n_foreign


def _mostly_latin(text: str) -> bool:
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return False
    latin = sum(1 for ch in letters if ord(ch) < 0x250)
    return latin >= 0.95 * len(letters)


def _finish(text: str, enc: str) -> tuple[str, str]:
    if _control_ratio(text) > 0.05:
        raise SkipFile(f"binary file (decodes as {enc} but is mostly control characters)")
    return text, enc


# --------------------------------------------------------------------------- loaders
def read_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a file with a size limit; :class:`SkipFile` on errors a user can fix."""
    try:
        size = path.stat().st_size
        if max_bytes and size > max_bytes:
            raise SkipFile(
                f"too large ({size:,} bytes > retriever.max_file_bytes={max_bytes:,}); "
                "split it or raise the limit"
            )
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1 if max_bytes else -1)
    except PermissionError:
        raise SkipFile("unreadable (permission denied)") from None
    except OSError as e:
        raise SkipFile(f"cannot read: {e.strerror or e}") from None
    if max_bytes and len(data) > max_bytes:
        raise SkipFile(f"too large (> retriever.max_file_bytes={max_bytes:,} bytes)")
    if not data:
        raise SkipFile("empty file (0 bytes)")
    return data


def load_file(path: Path, rel: str, data: bytes, *, jsonl_text_field: str = "text") -> LoadResult:
    """Decode one file's bytes into documents by its suffix. Raises :class:`SkipFile`."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _load_pdf(data, rel)
    text, enc = decode_bytes(data)
    notes = []
    if enc == TRUNCATED_UTF8:
        notes.append("ends inside a UTF-8 character (truncated file?); ingested the rest")
    elif enc.endswith(f"({GUESSED})"):
        enc = enc.split(" ", 1)[0]
        notes.append(f"not UTF-8: decoded as {enc} by a guess; check it or re-save as UTF-8")
    if suffix in HTML_SUFFIXES:
        docs = [LoadedDoc(html_text(text), rel, {"encoding": enc})]
        res = LoadResult(docs, encoding=enc)
    elif suffix == ".jsonl":
        res = _load_jsonl(text, rel, jsonl_text_field)
        res.encoding = enc
    else:
        res = LoadResult([LoadedDoc(text, rel, {"encoding": enc})], encoding=enc)
    res.warnings = notes + res.warnings
    res.docs = [d for d in res.docs if d.text.strip()]
    if not res.docs:
        if res.warnings:
            raise SkipFile("no usable records: " + "; ".join(res.warnings[:3]))
        raise SkipFile("no text (empty or whitespace only)")
    return res


def html_text(html: str) -> str:
    """Visible text of an HTML page: no script/style/template/head, block elements on lines."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head", "svg", "iframe"]):
        tag.decompose()
    text = soup.get_text("\n")
    lines = [re.sub(r"[ \t\u00a0]+", " ", ln).strip() for ln in text.splitlines()]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()


def _load_jsonl(text: str, rel: str, text_field: str) -> LoadResult:
    docs: list[LoadedDoc] = []
    warnings: list[str] = []
    # JSON Lines are separated by "\n" only: str.splitlines() would also split at U+2028,
    # U+0085 and friends, which JSON strings may contain raw.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            warnings.append(f"line {lineno}: invalid JSON ({e.msg})")
            continue
        if not isinstance(rec, dict):
            warnings.append(f"line {lineno}: not a JSON object")
            continue
        value = rec.get(text_field)
        if value is None:
            warnings.append(f"line {lineno}: no '{text_field}' field (data.jsonl_text_field)")
            continue
        if not isinstance(value, str):
            warnings.append(f"line {lineno}: '{text_field}' is {type(value).__name__}, not text")
            continue
        if not value.strip():
            warnings.append(f"line {lineno}: '{text_field}' is empty")
            continue
        meta: dict[str, Any] = {"line": lineno}
        for key in ("id", "title"):
            if isinstance(rec.get(key), str | int | float):
                meta[key] = rec[key]
        docs.append(LoadedDoc(value, rel, meta))
    return LoadResult(docs, warnings)


def _load_pdf(data: bytes, rel: str) -> LoadResult:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except Exception:
                opened = False
            if not opened:
                raise SkipFile("encrypted PDF (needs a password); decrypt it first")
        pages = [p.extract_text() or "" for p in reader.pages]
    except SkipFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        raise SkipFile(f"not a readable PDF ({type(e).__name__}: {str(e)[:80]})") from None
    except Exception as e:  # pypdf raises a zoo of errors on damaged files
        raise SkipFile(f"not a readable PDF ({type(e).__name__}: {str(e)[:80]})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise SkipFile("PDF has no text layer (scanned images?); OCR it first")
    return LoadResult([LoadedDoc(text, rel, {"pages": len(pages)})])


def iter_docs(
    root: Path, *, jsonl_text_field: str = "text", max_bytes: int = 0
) -> Iterator[tuple[str, LoadResult | SkipFile]]:
    """Convenience: every file under ``root`` loaded (or the reason it was skipped)."""
    files, skipped = discover(root)
    for rel, reason in skipped:
        yield rel, SkipFile(reason)
    for rel, path in files:
        try:
            yield (
                rel,
                load_file(
                    path, rel, read_bytes(path, max_bytes), jsonl_text_field=jsonl_text_field
                ),
            )
        except SkipFile as e:
            yield rel, e
