"""Oracle detection: how often each step finds the right chunk, and how often a false one.

    nice -n 10 python bench/oracle_detection.py [SQUAD_JSON] [--n 150] [--seed 0]

A labelled set of (answer, search space) pairs, chunked like the default retriever
(conf/retriever/minilm.yaml: 300 characters, overlap 30), searched like ``raft.py`` searches a
record with a ``source``: every chunk of that document.

Positives (the right answer; correct when the found chunk holds the gold answer span):
SQuAD answers verbatim; with numbers swapped between words and digits; with the corpus text
broken by a line break inside the answer; lightly paraphrased (a token dropped or a filler
word added, answers of 3+ tokens); long-form (the answer's sentence reworded: a lead-in, every
fourth word dropped); and hand-written paraphrases and long-form answers on the demo corpus.
Negatives (any chunk found is a false support): SQuAD answers searched among the chunks of
their article that do not hold them (on-topic distractors); long-form answers likewise;
hand-written wrong answers on the demo corpus; and the "plausible answers" of SQuAD's
unanswerable questions against their article, which are spans of it by construction.

Scores are computed once per pair (exact hit, best fuzzy, best semantic); the thresholds
sweep is applied afterwards. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# sleeping OpenMP workers: spinning ones make small torch ops ~100x slower on a shared CPU
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ragtune.embedding import embed_texts, load_embedder  # noqa: E402
from ragtune.ingest import make_splitter  # noqa: E402
from ragtune.oracle import (  # noqa: E402
    FUZZY_MIN,
    SEMANTIC_MIN,
    UNIT_WORDS,
    OracleFinder,
    exact_match,
    fuzzy_score,
    semantic_claim,
    tokens,
)
from ragtune.store import as_rcfg  # noqa: E402
from ragtune.types import Chunk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_REL = "shared/data/squad2-public/squad2-public.json"  # next to the checkout (or a worktree's)
SQUAD = next((p / _REL for p in ROOT.parents if (p / _REL).is_file()), ROOT.parent / _REL)
WORDS = UNIT_WORDS[:13]  # zero..twelve: the paraphrases this benchmark writes

# (question, answer, source, a string of the gold chunk or None for a wrong answer)
DEMO = [
    (
        "How many strings does a Brennick harp have?",
        "19",
        "culture/brennick_harp.md",
        "nineteen strings",
    ),
    (
        "Who built the first Brennick harp?",
        "The harp was first built in 1819 by Tamsin "
        "Brennick, a maker from Port Essling, who is said to have designed it so that her "
        "fisherman brother could take it on his boat.",
        "culture/brennick_harp.md",
        "1819",
    ),
    (
        "How is the Brennick harp played?",
        "Players pluck the strings with their fingernails. "
        "The left hand keeps up a drone on the three lowest strings while the right hand carries "
        "the tune.",
        "culture/brennick_harp.md",
        "fingernails",
    ),
    (
        "Where and how often is the Harp Moot held?",
        "in Kilmory Cross every 3 years",
        "culture/brennick_harp.md",
        "Kilmory Cross",
    ),
    (
        "How long does a new Brennick harp take to make?",
        "roughly 4 months",
        "culture/brennick_harp.md",
        "four months",
    ),
    (
        "How can you recognise a murrowfin?",
        "Its surest field mark is a line of three "
        "amber-coloured spots just behind the gill cover, found on fish of all ages.",
        "species/murrowfin.txt",
        "three amber spots",
    ),
    ("How long can a murrowfin live?", "up to 9 years", "species/murrowfin.txt", "nine years"),
    (
        "What are the fishing rules for murrowfin?",
        "The season opens on 1 June and closes on "
        "31 August; fish under 24 centimetres have to be put back, and an angler may keep no more "
        "than five a day.",
        "species/murrowfin.txt",
        "1 June",
    ),
    (
        "Where was Corvanite developed?",
        "Ismay Trelawn developed it at the Brindlecombe "
        "Metallurgical Works, a private lab and rolling mill on Corva Sound, and poured the first "
        "melt in 1929.",
        "materials/corvanite.md",
        "Brindlecombe",
    ),
    (
        "How long were the Corvanite test plates left in the sea?",
        "11 years",
        "materials/corvanite.md",
        "eleven years",
    ),
    (
        "What did sailors call Corvanite?",
        "Sailors nicknamed it sea bronze, even though there is no tin in it at all.",
        "materials/corvanite.md",
        "sea bronze",
    ),
    (
        "Where was Odalys Ferrant born?",
        "She was born in Drossel Fen on 14 March 1867; her "
        "father cut reeds for thatch and her mother wove rush mats.",
        "people/odalys_ferrant.txt",
        "Drossel Fen",
    ),
    (
        "Where did Odalys Ferrant study?",
        "From 1885 until 1888 she took evening classes in "
        "mechanics at Aldermoor Polytechnic, since women could not attend the daytime courses.",
        "people/odalys_ferrant.txt",
        "Aldermoor",
    ),
    (
        "Did Odalys Ferrant marry a cartographer?",
        "Yes.",
        "people/odalys_ferrant.txt",
        "Lucan Ferrant",
    ),
    (
        "Are Brennick harps played resting on the knees?",
        "Yes",
        "culture/brennick_harp.md",
        "resting on the knees",
    ),
    # wrong answers: no chunk supports them
    (
        "How many strings does a Brennick harp have?",
        "twenty-four strings",
        "culture/brennick_harp.md",
        None,
    ),
    (
        "Who built the first Brennick harp?",
        "The harp was invented in 1902 by a clockmaker in "
        "the capital, who designed it for concert halls and orchestras.",
        "culture/brennick_harp.md",
        None,
    ),
    (
        "How is the Brennick harp played?",
        "Players use a bow on the strings, and pedals let "
        "them change key quickly in the middle of a tune.",
        "culture/brennick_harp.md",
        None,
    ),
    (
        "When does the murrowfin spawn?",
        "It spawns in the autumn, in October, in the deep "
        "middle of the lake far away from any streams.",
        "species/murrowfin.txt",
        None,
    ),
    ("How long can a murrowfin live?", "up to 15 years", "species/murrowfin.txt", None),
    (
        "What does a murrowfin look like?",
        "Adults are usually about a metre long and have red "
        "spots along the back and a yellow belly.",
        "species/murrowfin.txt",
        None,
    ),
    (
        "Where was Corvanite developed?",
        "It was developed at a university laboratory in the capital by a team of chemists in 1950.",
        "materials/corvanite.md",
        None,
    ),
    (
        "What did sailors call Corvanite?",
        "Sailors called it grey steel, because it contains a lot of tin.",
        "materials/corvanite.md",
        None,
    ),
    (
        "Where did Odalys Ferrant study?",
        "She studied painting at a daytime art school in the capital and never married.",
        "people/odalys_ferrant.txt",
        None,
    ),
]


@dataclass
class Pair:
    group: str
    positive: bool
    question: str
    answer: str
    space: list[Chunk]
    gold: set[str]  # ids of the chunks that hold the answer (empty for negatives)


def chunk_documents(docs: Sequence[tuple[str, str]]) -> dict[str, list[Chunk]]:
    splitter = make_splitter(as_rcfg({"chunk_size": 300, "chunk_overlap": 30}))
    out: dict[str, list[Chunk]] = {}
    for source, text in docs:
        pieces = splitter.create_documents([text])
        out[source] = [
            Chunk(f"{source}#{i}", p.page_content, source, p.metadata["start_index"], "")
            for i, p in enumerate(pieces)
        ]
    return out


def holding(chunks: list[Chunk], answer: str) -> set[str]:
    a = tokens(answer)
    return {c.id for c in chunks if exact_match(a, tokens(c.text))}


def swap_numbers(answer: str) -> str | None:
    m = re.search(r"\b(\d{1,2})\b", answer)
    if m and int(m.group(1)) < len(WORDS):
        return answer[: m.start()] + WORDS[int(m.group(1))] + answer[m.end() :]
    m = re.search(rf"\b({'|'.join(WORDS)})\b", answer, flags=re.I)
    if m:
        return answer[: m.start()] + str(WORDS.index(m.group(1).lower())) + answer[m.end() :]
    return None


def paraphrase(answer: str, rng: random.Random) -> str:
    words = answer.split()
    if rng.random() < 0.5 and len(words) >= 4:
        del words[rng.randrange(1, len(words))]
    else:
        words.insert(rng.randrange(0, len(words) + 1), rng.choice(["about", "mainly", "its"]))
    return " ".join(words)


def reword(sentence: str) -> str:
    words = sentence.split()
    kept = [w for i, w in enumerate(words) if i % 4 != 3]
    return "From what the document says, " + " ".join(kept)


def squad_pairs(path: Path, n: int, seed: int) -> list[Pair]:
    data = json.loads(path.read_text())["data"]
    rng = random.Random(seed)
    docs, items, plausible = [], [], []
    for art in data:
        source = f"squad/{art['title']}.txt"
        docs.append((source, "\n\n".join(p["context"] for p in art["paragraphs"])))
        for p in art["paragraphs"]:
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    for a in qa.get("plausible_answers", [])[:1]:
                        plausible.append((source, qa["question"], a["text"]))
                else:
                    a = qa["answers"][0]
                    items.append((source, p["context"], qa["question"], a["text"]))
    chunks = chunk_documents(docs)
    rng.shuffle(items)
    rng.shuffle(plausible)
    pairs: list[Pair] = []
    count: dict[str, int] = {}

    def add(group: str, positive: bool, q: str, a: str, space: list[Chunk], gold: set[str]) -> None:
        if count.get(group, 0) < n and space:
            count[group] = count.get(group, 0) + 1
            pairs.append(Pair(group, positive, q, a, space, gold))

    for source, context, q, a in items:
        own = chunks[source]
        gold = holding(own, a)
        if not gold:
            continue  # the answer straddles a chunk boundary: no chunk holds it
        add("squad verbatim", True, q, a, own, gold)
        swapped = swap_numbers(a)
        if swapped:
            add("squad number words<->digits", True, q, swapped, own, gold)
        if len(a.split()) >= 2:
            cut = a.replace(" ", "\n", 1)
            broken = [Chunk(c.id + "~", c.text.replace(a, cut), c.source, c.start, "") for c in own]
            add("squad line break in the text", True, q, a, broken, {g + "~" for g in gold})
        if len(tokens(a)) >= 3:
            add("squad paraphrase (+/- a word)", True, q, paraphrase(a, rng), own, gold)
        sent = next(
            (s for s in re.split(r"(?<=[.!?])\s+", context) if a in s and len(s.split()) >= 12),
            None,
        )
        if sent:
            add("squad long-form (reworded sentence)", True, q, reword(sent), own, gold)
            others = [c for c in own if c.id not in gold and not _overlaps(c, sent)]
            add(
                "neg: long-form vs its article's other chunks",
                False,
                q,
                reword(sent),
                others,
                set(),
            )
        others = [c for c in own if c.id not in gold]
        add("neg: answer vs its article's other chunks", False, q, a, others, set())
    for source, q, a in plausible:
        add("neg: SQuAD plausible answer vs its article", False, q, a, chunks[source], set())
    return pairs


def _overlaps(chunk: Chunk, sentence: str) -> bool:
    words = sentence.split()
    return any(" ".join(words[i : i + 5]) in chunk.text for i in range(0, len(words) - 4, 3))


def demo_pairs() -> list[Pair]:
    docs = {}
    for _, _, source, _ in DEMO:
        docs[source] = (ROOT / "data/corpus" / source).read_text()
    chunks = chunk_documents(list(docs.items()))
    pairs = []
    for q, a, source, hint in DEMO:
        own = chunks[source]
        gold = {c.id for c in own if hint and hint.lower() in c.text.lower()}
        group = "demo hand-written" if hint else "neg: demo wrong answers"
        pairs.append(Pair(group, hint is not None, q, a, own, gold))
    return pairs


def score(pairs: list[Pair], finder: OracleFinder) -> list[dict]:
    rows = []
    for i, p in enumerate(pairs):
        if i % 100 == 0:
            print(f"scored {i}/{len(pairs)}", file=sys.stderr, flush=True)
        ans = tokens(p.answer)
        toks = [tokens(c.text) for c in p.space]
        exact = next(
            (c.id for c, t in zip(p.space, toks, strict=True) if exact_match(ans, t)), None
        )
        fz = [fuzzy_score(ans, t) for t in toks]
        fi = max(range(len(fz)), key=fz.__getitem__)
        claim = semantic_claim(p.answer, p.question)
        sm = finder.semantic_scores(claim, p.space) if claim else [0.0] * len(p.space)
        si = max(range(len(sm)), key=sm.__getitem__)
        rows.append(
            {
                "group": p.group,
                "positive": p.positive,
                "exact": exact,
                "fuzzy": (fz[fi], p.space[fi].id),
                "semantic": (sm[si], p.space[si].id),
                "gold": p.gold,
            }
        )
    return rows


def decide(r: dict, fuzzy_min: float, semantic_min: float) -> tuple[str, str | None]:
    if r["exact"]:
        return "exact", r["exact"]
    if r["fuzzy"][0] >= fuzzy_min:
        return "fuzzy", r["fuzzy"][1]
    if r["semantic"][0] >= semantic_min:
        return "semantic", r["semantic"][1]
    return "none", None


def table(rows: list[dict], fuzzy_min: float, semantic_min: float) -> list[dict]:
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        g = [r for r in rows if r["group"] == group]
        how = [decide(r, fuzzy_min, semantic_min) for r in g]
        n = len(g)
        line = {"group": group, "n": n}
        for h in ("exact", "fuzzy", "semantic", "none"):
            line[h] = sum(x[0] == h for x in how) / n
        if g[0]["positive"]:
            line["right_chunk"] = sum(c in r["gold"] for r, (_, c) in zip(g, how, strict=True)) / n
        else:
            line["false_support"] = sum(c is not None for _, c in how) / n
        out.append(line)
    return out


def sweep(rows: list[dict]) -> dict[str, list[dict]]:
    """False supports on the negatives vs recall on positives, per threshold of one step."""
    negs = [r for r in rows if not r["positive"] and "plausible" not in r["group"]]
    poss = [r for r in rows if r["positive"]]
    out: dict[str, list[dict]] = {"fuzzy": [], "semantic": []}
    for t in (0.6, 0.67, 0.7, 0.75, 0.8, 0.85, 0.9, 1.01):
        out["fuzzy"].append(_point(poss, negs, t, SEMANTIC_MIN))
    for t in (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 1.01):
        out["semantic"].append(_point(poss, negs, FUZZY_MIN, t, key="semantic"))
    return out


def _point(poss: list, negs: list, f: float, s: float, key: str = "fuzzy") -> dict:
    found = [decide(r, f, s)[1] for r in poss]
    return {
        "threshold": f if key == "fuzzy" else s,
        "right_chunk": sum(c in r["gold"] for r, c in zip(poss, found, strict=True)) / len(poss),
        "false_support": sum(decide(r, f, s)[1] is not None for r in negs) / len(negs),
    }


def coverage(path: Path) -> dict[str, float]:
    """Share of SQuAD's answerable records whose article has a supporting chunk (no embedder)."""
    from ragtune.qa import load_qa, squad_documents

    chunks = chunk_documents(squad_documents(path))

    class Store:
        def find(self, contains=None, source=None, limit=50):  # noqa: ANN001, ANN202
            return chunks.get(source, [])

    finder = OracleFinder(Store())
    records = [r for r in load_qa(path) if r.answerable]
    verbatim = sum(
        any(r.output.strip().casefold() in c.text.casefold() for c in chunks[r.source])
        for r in records
    )
    found = sum(finder.find(r).found for r in records)
    n = len(records)
    return {"records": n, "verbatim_substring": verbatim / n, "exact_or_fuzzy": found / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("squad", nargs="?", default=str(SQUAD))
    ap.add_argument("--n", type=int, default=150, help="pairs per SQuAD group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coverage-only", action="store_true", help="only the SQuAD coverage line")
    args = ap.parse_args()
    if args.coverage_only:
        print(json.dumps(coverage(Path(args.squad))))
        return
    model = load_embedder("minilm-l6", "cpu")
    finder = OracleFinder(
        None,  # type: ignore[arg-type]  # only the scoring functions are used
        lambda texts: embed_texts(model, list(texts), normalize=True, batch_size=64),
    )
    pairs = squad_pairs(Path(args.squad), args.n, args.seed) + demo_pairs()
    rows = score(pairs, finder)
    result = {
        "thresholds": {"fuzzy_min": FUZZY_MIN, "semantic_min": SEMANTIC_MIN},
        "table": table(rows, FUZZY_MIN, SEMANTIC_MIN),
        "sweep": sweep(rows),
        "coverage": coverage(Path(args.squad)),
    }
    for line in result["table"]:
        print(line)
    for key, pts in result["sweep"].items():
        for pt in pts:
            print(key, pt)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
