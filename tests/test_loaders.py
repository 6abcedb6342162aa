"""Bad corpus input (issue 3.7 and 8.3): every case gets a clear reason naming the file, the
rest of the corpus still loads, and the ingest reports it (so train/index.py exits 1).

Each case builds a small corpus folder. ``scan`` runs exactly the path the ingest takes per
file (discover -> read_bytes with the size limit -> load_file); one ingest test runs all
cases together through the real index.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ragtune import loaders
from ragtune.config import RetrieverConfig
from ragtune.ingest import ingest
from ragtune.loaders import SkipFile, decode_bytes, discover, load_file, read_bytes, safe_relpath
from ragtune.retriever import Retriever

JA = "月森焼は、白峰県の南部にある月森村で作られている陶器である。素朴な形と青い釉薬で知られる。"
EN = "Corvanite is a copper-nickel alloy developed by Ismay Trelawn for ship propellers."
MAX_BYTES = 20_000


def make_pdf(text: str | None) -> bytes:
    """A minimal one-page PDF with a Helvetica text layer (or no text at all)."""
    content = b"" if text is None else b"BT /F1 12 Tf 72 712 Td (" + text.encode() + b") Tj ET"
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def encrypted_pdf() -> bytes:
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(EN))))
    w.encrypt("secret", algorithm="RC4-40")
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes | str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def link(root: Path, rel: str, target: str | Path) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def _fifo(root: Path) -> None:
    os.mkfifo(root / "pipe.txt")


def _bad_name(root: Path) -> None:
    # a file name that is not valid UTF-8 (allowed by Linux file systems)
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "wb") as f:
        f.write(EN.encode())


# Each case: (id, build(root), rel path, expectation)
#   ("skip", reason substring)   the file is skipped with that reason
#   ("ok", text substring)       the file loads and its text contains the substring
#   ("warn", warning substring)  the file loads but reports a problem (bad JSONL lines ...)
#   ("ignored", "")              silently not a corpus file (hidden)
Case = tuple[str, Callable[[Path], None], str, tuple[str, str]]
CASES: list[Case] = [
    (
        "nul-bytes",
        lambda r: put(r, "bin.txt", b"abc\x00\x01\x02" * 100),
        "bin.txt",
        ("skip", "binary"),
    ),
    (
        "random-bytes",
        lambda r: put(r, "rand.md", bytes((i * 7919) % 256 for i in range(4000))),
        "rand.md",
        ("skip", "binary"),
    ),
    (
        "png-as-txt",
        lambda r: put(r, "img.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 30),
        "img.txt",
        ("skip", "binary"),
    ),
    (
        "control-chars",
        lambda r: put(r, "ctl.txt", "\x01\x02\x03\x04\x05\x06\x07\x08" * 80),
        "ctl.txt",
        ("skip", "binary"),
    ),
    (
        "html-binary",
        lambda r: put(r, "page.html", b"\xff\xd8\xff\xe0\x00\x10JFIF" * 40),
        "page.html",
        ("skip", "binary"),
    ),
    (
        "invalid-utf8-in-utf8-text",
        lambda r: put(
            r, "bad.md", (JA + "\n" + JA).encode() + b"\n\xff\xfe broken\n" + JA.encode()
        ),
        "bad.md",
        ("skip", "mixed encodings"),
    ),
    (
        "mixed-utf8-and-shift-jis",
        lambda r: put(r, "mix.txt", JA.encode() + b"\n" + JA.encode("cp932") + b"\n"),
        "mix.txt",
        ("skip", "mixed encodings"),
    ),
    (
        "mixed-utf8-and-latin1",
        lambda r: put(r, "mix2.txt", "Café crème.\n".encode() + "Déjà vu.\n".encode("latin-1")),
        "mix2.txt",
        ("skip", "mixed encodings"),
    ),
    (
        "utf8-bom-but-invalid",
        lambda r: put(r, "bom.txt", b"\xef\xbb\xbfabc \xff\xfe\xfd"),
        "bom.txt",
        ("skip", "byte-order mark"),
    ),
    ("zero-bytes", lambda r: put(r, "empty.txt", b""), "empty.txt", ("skip", "empty file")),
    (
        "whitespace-only",
        lambda r: put(r, "blank.md", " \n\t\n   \n"),
        "blank.md",
        ("skip", "no text"),
    ),
    (
        "bom-only",
        lambda r: put(r, "bomonly.txt", b"\xef\xbb\xbf"),
        "bomonly.txt",
        ("skip", "no text"),
    ),
    (
        "html-only-script",
        lambda r: put(r, "s.html", "<script>var a=1;</script><style>p{}</style>"),
        "s.html",
        ("skip", "no text"),
    ),
    (
        "too-large",
        lambda r: put(r, "big.txt", "word " * (MAX_BYTES // 4)),
        "big.txt",
        ("skip", "too large"),
    ),
    ("empty-jsonl", lambda r: put(r, "e.jsonl", b""), "e.jsonl", ("skip", "empty")),
    (
        "jsonl-all-malformed",
        lambda r: put(r, "m.jsonl", '{"text": "a"\nnot json\n[1, 2]\n'),
        "m.jsonl",
        ("skip", "no usable records"),
    ),
    (
        "jsonl-some-malformed",
        lambda r: put(r, "p.jsonl", f'{{"text": "{EN}"}}\n{{oops\n'),
        "p.jsonl",
        ("warn", "line 2: invalid JSON"),
    ),
    (
        "jsonl-missing-field",
        lambda r: put(r, "f.jsonl", f'{{"text": "{EN}"}}\n{{"body": "x"}}\n'),
        "f.jsonl",
        ("warn", "line 2: no 'text' field"),
    ),
    (
        "jsonl-non-string",
        lambda r: put(r, "n.jsonl", f'{{"text": "{EN}"}}\n{{"text": [1, 2]}}\n'),
        "n.jsonl",
        ("warn", "'text' is list"),
    ),
    (
        "jsonl-not-object",
        lambda r: put(r, "o.jsonl", f'{{"text": "{EN}"}}\n"just a string"\n'),
        "o.jsonl",
        ("warn", "line 2: not a JSON object"),
    ),
    (
        "corrupt-pdf",
        lambda r: put(r, "c.pdf", b"%PDF-1.7\n garbage \x00\x01 not a pdf"),
        "c.pdf",
        ("skip", "PDF"),
    ),
    (
        "pdf-without-text-layer",
        lambda r: put(r, "scan.pdf", make_pdf(None)),
        "scan.pdf",
        ("skip", "no text layer"),
    ),
    (
        "encrypted-pdf",
        lambda r: put(r, "enc.pdf", encrypted_pdf()),
        "enc.pdf",
        ("skip", "encrypted PDF"),
    ),
    (
        "unsupported-suffix",
        lambda r: put(r, "tool.exe", b"MZ\x90\x00"),
        "tool.exe",
        ("skip", "unsupported file type '.exe'"),
    ),
    ("no-suffix", lambda r: put(r, "README", EN), "README", ("skip", "unsupported file type")),
    ("fifo", _fifo, "pipe.txt", ("skip", "not a regular file")),
    ("symlink-loop-dir", lambda r: link(r, "sub/loop", ".."), "sub/loop", ("skip", "symlink loop")),
    (
        "symlink-self-loop",
        lambda r: link(r, "self.txt", "self.txt"),
        "self.txt",
        ("skip", "symlink loop"),
    ),
    (
        "broken-symlink",
        lambda r: link(r, "gone.txt", "missing.txt"),
        "gone.txt",
        ("skip", "broken symlink or symlink loop"),
    ),
    (
        "symlink-out-of-root-file",
        lambda r: link(r, "passwd.txt", "/etc/passwd"),
        "passwd.txt",
        ("skip", "leaves the corpus root"),
    ),
    (
        "symlink-out-of-root-dir",
        lambda r: link(r, "etc", "/etc"),
        "etc",
        ("skip", "leaves the corpus root"),
    ),
    (
        "symlink-dotdot-escape",
        lambda r: link(r, "up/esc.md", "../../../outside.md"),
        "up/esc.md",
        ("skip", "leaves the corpus root"),
    ),
    (
        "invalid-utf8-not-guessed-as-cp1252",
        lambda r: put(r, "bad.txt", b"Valid start \xff\xfe\xfa then \xc3\x28 broken"),
        "bad.txt",
        ("skip", "below the confidence bar"),
    ),
    (
        "cp1251-read-as-cp1252-is-refused-then-guessed-right",
        lambda r: put(r, "ru.txt", "Привет, как дела? Это текст.".encode("cp1251")),
        "ru.txt",
        ("warn", "decoded as cp1251 by a guess"),
    ),
    ("name-not-utf8", _bad_name, "caf\\xe9.txt", ("skip", "not valid UTF-8")),
    (
        "name-with-newline",
        lambda r: put(r, "a\nb.txt", EN),
        "a\\nb.txt",
        ("skip", "control characters"),
    ),
    # accepted inputs, each decoded correctly
    (
        "hidden-file-ignored",
        lambda r: put(r, ".DS_Store", b"\x00\x00\x00\x01Bud1"),
        ".DS_Store",
        ("ignored", ""),
    ),
    (
        "symlink-inside-root",
        lambda r: (put(r, "real.md", EN), link(r, "alias.md", "real.md")),
        "alias.md",
        ("ok", "Ismay Trelawn"),
    ),
    ("shift-jis", lambda r: put(r, "sjis.txt", JA.encode("cp932")), "sjis.txt", ("ok", "月森焼")),
    ("euc-jp", lambda r: put(r, "euc.txt", JA.encode("euc_jp")), "euc.txt", ("ok", "青い釉薬")),
    ("utf16-bom", lambda r: put(r, "u16.txt", JA.encode("utf-16")), "u16.txt", ("ok", "月森村")),
    (
        "utf16-no-bom",
        lambda r: put(r, "u16le.txt", EN.encode("utf-16-le")),
        "u16le.txt",
        ("ok", "Corvanite is"),
    ),
    (
        "latin1",
        lambda r: put(r, "l1.txt", "Café crème brûlée à Orléans.".encode("latin-1")),
        "l1.txt",
        ("ok", "Café crème brûlée"),
    ),
    (
        "cp1252-typography",
        lambda r: put(
            r, "q.txt", "“Quotes” — naïve façade, 5 €; Ça va? À bientôt.".encode("cp1252")
        ),
        "q.txt",
        ("ok", "naïve façade, 5 €"),
    ),
    (
        "utf8-truncated-last-char",
        lambda r: put(r, "cut.txt", JA.encode()[:-1]),
        "cut.txt",
        ("warn", "truncated"),
    ),
    ("pdf-text-layer", lambda r: put(r, "doc.pdf", make_pdf(EN)), "doc.pdf", ("ok", "Trelawn")),
    (
        "html-visible-text-only",
        lambda r: put(
            r,
            "v.html",
            f"<html><head><title>t</title><script>evil()</script></head>"
            f"<body><p>{EN}</p><style>p{{}}</style></body></html>",
        ),
        "v.html",
        ("ok", "Corvanite"),
    ),
]


def scan(root: Path) -> dict[str, tuple[str, object]]:
    """rel -> ("skip", reason) | ("ok", LoadResult): the per-file path of the ingest."""
    files, skipped = discover(root)
    out: dict[str, tuple[str, object]] = {rel: ("skip", reason) for rel, reason in skipped}
    for rel, path in files:
        try:
            out[rel] = ("ok", load_file(path, rel, read_bytes(path, MAX_BYTES)))
        except SkipFile as e:
            out[rel] = ("skip", e.reason)
    return out


@pytest.mark.parametrize(
    ("build", "rel", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_case(tmp_path, build, rel, expect):
    root = tmp_path / "corpus"
    root.mkdir()
    (tmp_path / "outside.md").write_text("secret outside the corpus")
    put(root, "good.md", EN)  # the rest of the corpus always still loads
    build(root)
    # ... including what comes after the case in its own folder and in the root
    after = sorted({"zz.md", str(Path(rel).parent / "zz.md")} - {"./zz.md"})
    for a in after:
        if (root / a).parent.is_dir() and not (root / a).parent.is_symlink():
            put(root, a, EN)
    got = scan(root)
    assert got["good.md"][0] == "ok"
    assert all(got[a][0] == "ok" for a in after if (root / a).exists()), got
    kind, want = expect
    if kind == "ignored":
        assert rel not in got
        return
    status, value = got[rel]
    if kind == "skip":
        assert status == "skip" and want in value, (rel, status, value)
        return
    assert status == "ok", (rel, value)
    text = "\n".join(d.text for d in value.docs)
    if kind == "ok":
        assert want in text and not value.warnings
        assert "\ufffd" not in text and "secret" not in text
    else:
        assert any(want in w for w in value.warnings), value.warnings
        assert text.strip()


def test_unreadable_file_and_folder_are_reported(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    put(root, "good.md", EN)
    put(root, "secret.md", EN)
    put(root, "locked/inner.md", EN)
    os.chmod(root / "secret.md", 0)
    os.chmod(root / "locked", 0)
    try:
        if os.geteuid() == 0:  # root reads anything: simulate what a normal user sees
            real_open, real_scandir = open, os.scandir

            def fake_open(path, *a, **kw):
                if str(path).endswith("secret.md"):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(path, *a, **kw)

            def fake_scandir(path):
                if str(path).endswith("locked"):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_scandir(path)

            monkeypatch.setattr(loaders, "open", fake_open, raising=False)
            monkeypatch.setattr(loaders.os, "scandir", fake_scandir)
        got = scan(root)
    finally:
        os.chmod(root / "secret.md", 0o644)
        os.chmod(root / "locked", 0o755)
    assert got["good.md"][0] == "ok"
    assert got["secret.md"] == ("skip", "unreadable (permission denied)")
    assert got["locked"] == ("skip", "cannot list folder: Permission denied")


@pytest.mark.parametrize("rel", ["../etc/passwd", "a/../../b.txt", "/abs/path.md", "a//b.md", ""])
def test_dotdot_and_absolute_paths_are_refused(rel):
    with pytest.raises(SkipFile):
        safe_relpath(rel)


def test_decode_prefers_japanese_over_korean_and_latin1_over_baltic():
    short = "月森焼の青い釉薬"  # charset-normalizer alone calls short Shift_JIS cp949
    assert decode_bytes(short.encode("cp932")) == (short, "cp932")
    assert decode_bytes("déjà".encode("latin-1"))[0] == "déjà"


def test_a_refused_guess_names_the_most_confident_encoding():
    """The message says which encoding came closest, and how close, so a user knows what
    to re-save from; a guess only charset-normalizer makes (cp1252 cannot decode 0x81) counts."""
    with pytest.raises(SkipFile, match=r"the best guess, cp1252, .* \(0\.25 < 0\.8\)"):
        decode_bytes(b"Valid start \xff\xfe\xfa then \xc3\x28 broken")
    with pytest.raises(SkipFile, match=r"the best guess, \S+, is below the confidence bar"):
        decode_bytes(b"Valid start \xff\xfe\xfa then \x81 broken")


def test_decoding_edges():
    # a big-endian UTF-16 byte-order mark
    assert decode_bytes(b"\xfe\xff" + JA.encode("utf-16-be")) == (JA, "utf-16-be")
    # a few stray control characters (4%: escape codes) do not make text binary
    text = "a" * 96 + "\x1b" * 4
    assert decode_bytes(text.encode()) == (text, "utf-8")
    with pytest.raises(SkipFile, match="mostly control characters"):
        decode_bytes(("a" * 94 + "\x1b" * 6).encode())
    # a three-letter UTF-8 line next to a Latin-1 one: mixed, and where the bad byte is
    with pytest.raises(SkipFile, match=r"mixed encodings: .*first invalid byte at offset 8\)"):
        decode_bytes("née\n".encode() + b"caf\xe9 au lait\n")
    # a Latin-1 text exactly at the confidence bar is taken (only below it is refused)
    at_bar = "café résumé naïve déjà façade über ÿþ"  # 8 of 10 accented letters in place
    assert loaders.guess_confidence(at_bar) == loaders.GUESS_CONFIDENCE == 0.8
    assert decode_bytes(at_bar.encode("cp1252")) == (at_bar, "cp1252")
    # a document half in another script is that script, not mojibake
    assert loaders.guess_confidence("ab вг") == 1.0


def test_a_jsonl_record_with_empty_text_is_warned_about_and_the_next_one_loads():
    data = b'{"text": " "}\n{"text": "Corvanite is an alloy.", "id": 7}\n'
    got = load_file(Path("notes.jsonl"), "notes.jsonl", data)
    assert got.warnings == ["line 1: 'text' is empty"]
    assert [(d.text, d.metadata) for d in got.docs] == [
        ("Corvanite is an alloy.", {"line": 2, "id": 7})
    ]


def test_all_cases_together_through_the_real_ingest(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (tmp_path / "outside.md").write_text("secret outside the corpus")
    put(root, "good.md", EN)
    for name, build, _rel, _ in CASES:
        sub = root / name
        sub.mkdir()
        build(sub)
    rcfg = RetrieverConfig(
        persist_dir=str(tmp_path / "index"),
        max_file_bytes=MAX_BYTES,
        chunk_size=300,
        chunk_overlap=0,
    )
    rep = ingest(root, rcfg, show_progress=False)
    assert not rep.ok
    problems = {}
    for rel, reason in rep.skipped:
        problems.setdefault(rel, []).append(reason)
    for name, _, rel, (kind, want) in CASES:
        key = f"{name}/{rel}"
        if kind in ("skip", "warn"):
            assert any(want in r for r in problems.get(key, [])), (key, problems.get(key))
        else:
            assert key not in problems, (key, problems[key])
    ret = Retriever.from_config(rcfg)
    sources = {c.source for c in ret.find(limit=0)}
    ok = {f"{n}/{r}" for n, _, r, (k, _) in CASES if k in ("ok", "warn")}
    assert ok | {"good.md"} <= sources
    assert not ret.find(contains="secret outside")
    # a rerun changes nothing and embeds nothing; the same problems are reported again
    again = ingest(root, rcfg, show_progress=False)
    assert again.embedded == 0 and sorted(again.skipped) == sorted(rep.skipped)
