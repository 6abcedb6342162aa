"""Embedder fine-tuning: it moves the weights without losing validation recall, a tuned embedder
gets its own index collection, a mismatched index is refused, and the stages accept its folder.

One tiny tuning run (MiniLM, a dozen fictional towns, a few steps) is shared by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.config import RetrieverConfig, compose
from ragtune.ingest import IndexMismatchError, collection_name, ingest
from ragtune.retriever import Retriever
from ragtune.training.embedder import (
    EmbedTuneError,
    Triplet,
    as_embed_ft_config,
    mine_triplets,
    recall_summary,
    run_embed_ft,
    split_by_source,
    training_columns,
    training_prompts,
)
from ragtune.types import Chunk

TOWNS = [
    ("Arvel", "Tamsin Orle", "Quill", "March"),
    ("Brisk", "Hollis Venn", "Marrow", "April"),
    ("Cadogan", "Ysolde Pike", "Fennick", "May"),
    ("Dunmere", "Corin Ashby", "Lathe", "June"),
    ("Elsby", "Wren Talbot", "Stour", "July"),
    ("Fallow", "Idris Mope", "Kettle", "August"),
    ("Garrow", "Nell Quince", "Brack", "September"),
    ("Holm", "Piers Ullet", "Dray", "October"),
    ("Istow", "Maud Fenner", "Sallow", "November"),
    ("Jessop", "Ansel Crane", "Wick", "December"),
]


def town_doc(town: str, mayor: str, river: str, month: str) -> str:
    # every paragraph names the town: the question's town alone does not pick the chunk
    return "\n\n".join(
        [
            f"The mayor of {town} is {mayor}.",
            f"{town} lies on the river {river}.",
            f"{town} holds its fair in {month}.",
            f"{town} has a stone bridge and a mill.",
        ]
    )


def town_questions(town: str, mayor: str, river: str, month: str) -> list[dict[str, str]]:
    src = f"towns/{town.lower()}.txt"
    return [
        {"instruction": f"Who runs the council in {town}?", "output": mayor, "source": src},
        {"instruction": f"Which water passes {town}?", "output": river, "source": src},
        {"instruction": f"When do traders gather in {town}?", "output": month, "source": src},
    ]


@pytest.fixture(scope="module")
def towns(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("towns")
    corpus = root / "corpus" / "towns"
    corpus.mkdir(parents=True)
    rows = []
    for t in TOWNS:
        (corpus / f"{t[0].lower()}.txt").write_text(town_doc(*t), encoding="utf-8")
        rows += town_questions(*t)
    (root / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def overrides(root: Path) -> list[str]:
    return [
        f"data.corpus={root / 'corpus'}",
        f"data.qa_train={root / 'qa.jsonl'}",
        f"retriever.persist_dir={root / 'index'}",
        "retriever.chunk_size=60",
        "retriever.chunk_overlap=0",
        "retriever.fetch_k=8",
    ]


@pytest.fixture(scope="module")
def tuned(towns: Path):
    """(result, base retriever config, run folder): one tuning run for the module."""
    out = towns / "run"
    cfg = compose(
        "embed_ft",
        [
            *overrides(towns),
            f"output_dir={out}",
            "embed_ft.val_fraction=0.3",
            "embed_ft.recall_k=1",
            "embed_ft.epochs=3",
            "embed_ft.batch_size=8",
            "embed_ft.learning_rate=1e-4",
            "embed_ft.evals_per_epoch=1",
            "embed_ft.device=cpu",
            "retriever.device=cpu",
        ],
    )
    result = run_embed_ft(cfg)
    return result, cfg


def base_rcfg(towns: Path, **kw) -> RetrieverConfig:
    return RetrieverConfig(
        persist_dir=str(towns / "index"),
        chunk_size=60,
        chunk_overlap=0,
        fetch_k=8,
        device="cpu",
        **kw,
    )


def test_tuning_moves_the_embedder_without_losing_validation_recall(tuned):
    from safetensors.torch import load_file

    from ragtune.models import embedder_dir

    result, _ = tuned
    assert result.recall_before["recall@1"] < 1.0  # the fixture is one the base model misses
    assert result.recall_after["recall@1"] >= result.recall_before["recall@1"]
    base = load_file(str(embedder_dir() / "model.safetensors"))
    new = load_file(str(result.path / "model.safetensors"))
    changed = [k for k in base if k in new and not (base[k] == new[k]).all()]
    assert len(changed) > len(base) // 2  # fine-tuned, not a copy

    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["kind"] == "ragtune-embedder"
    assert manifest["base_model"] == "minilm-l6"
    assert manifest["data_fingerprint"] == result.data_fingerprint
    assert manifest["validation"]["before"] == result.recall_before
    assert manifest["validation"]["after"] == result.recall_after
    assert manifest["data"]["validation_sources"]  # held out by source
    assert (result.path / "modules.json").exists()  # a sentence-transformers folder


def test_a_tuned_embedder_gets_its_own_collection(tuned, towns):
    import chromadb
    import numpy as np
    from sentence_transformers import SentenceTransformer

    result, _ = tuned
    base, mine = base_rcfg(towns), base_rcfg(towns, embedding_model=str(result.path))
    corpus = towns / "corpus"
    assert collection_name(base, corpus) != collection_name(mine, corpus)
    n_base = ingest(towns / "corpus", base, show_progress=False).total_chunks
    report = ingest(towns / "corpus", mine, show_progress=False)
    assert report.embedded == report.total_chunks == n_base  # every chunk re-embedded

    client = chromadb.PersistentClient(path=str(towns / "index"))
    names = {c if isinstance(c, str) else c.name for c in client.list_collections()}
    assert {collection_name(base, corpus), collection_name(mine, corpus)} <= names
    got = client.get_collection(collection_name(mine, corpus)).get(
        include=["documents", "embeddings"], limit=3
    )
    want = SentenceTransformer(str(result.path), device="cpu").encode(
        got["documents"], normalize_embeddings=True
    )
    assert np.allclose(np.asarray(got["embeddings"]), want, atol=1e-4)  # the tuned vectors
    assert (
        client.get_collection(collection_name(base, corpus)).count() == n_base
    )  # base one untouched


def test_an_index_built_by_another_embedder_is_refused(tuned, towns):
    result, _ = tuned
    shared = {"collection": "towns-shared"}
    ingest(towns / "corpus", base_rcfg(towns, **shared), show_progress=False)
    swapped = base_rcfg(towns, embedding_model=str(result.path), **shared)
    with pytest.raises(IndexMismatchError, match="embedding_model"):
        Retriever.from_config(swapped)
    with pytest.raises(IndexMismatchError, match="embedding_model"):
        ingest(towns / "corpus", swapped, show_progress=False)


def test_the_tuned_folder_is_written_once(tuned, towns):
    result, _ = tuned
    cfg = compose(
        "embed_ft",
        [*overrides(towns), f"output_dir={towns / 'run2'}", f"embed_ft.save_dir={result.path}"],
    )
    with pytest.raises(EmbedTuneError, match="written once"):
        run_embed_ft(cfg)


def test_sft_retrieves_with_the_tuned_embedder(tuned, towns, tokenizer):
    from ragtune.config import validate
    from ragtune.training.data import open_retriever

    result, _ = tuned
    cfg = compose(
        "sft",
        [
            *overrides(towns),
            f"retriever.embedding_model={result.path}",
            f"output_dir={towns / 'sft'}",
        ],
    )
    cfg = validate(cfg, top_level={"seed": int, "output_dir": str})
    retriever = open_retriever(cfg, tokenizer)
    assert retriever.settings()["embedding_model"] == str(result.path)
    assert retriever.settings()["collection"] == collection_name(
        base_rcfg(towns, embedding_model=str(result.path)), towns / "corpus"
    )
    assert retriever.retrieve("Who is the mayor of Holm?")


def test_validation_is_held_out_by_source():
    def row(i: int, src: str) -> Triplet:
        c = Chunk(f"c{i}", f"text {i}", src, 0, "h")
        return Triplet(f"q{i}", c, (c,), src, "a")

    rows = [row(i, f"s{i % 5}") for i in range(20)]
    train, val = split_by_source(rows, 0.4, seed=1)
    assert {r.source for r in train}.isdisjoint({r.source for r in val})
    assert len({r.source for r in val}) == 2 and len(train) + len(val) == 20
    with pytest.raises(EmbedTuneError, match="at least 2"):
        split_by_source([row(i, "one") for i in range(4)], 0.2, seed=1)
    # two sources are enough: one trains, one validates, whatever the fraction asks
    two = [row(i, f"s{i % 2}") for i in range(6)]
    for fraction in (0.1, 0.9):
        train, val = split_by_source(two, fraction, seed=1)
        assert len({r.source for r in train}) == len({r.source for r in val}) == 1
        assert len(train) == len(val) == 3
    cols = training_columns(rows, negatives=1)
    assert list(cols) == ["anchor", "positive", "negative_1"]


def test_bad_settings_name_the_key():
    with pytest.raises(EmbedTuneError, match="embed_ft.val_fraction"):
        as_embed_ft_config({"val_fraction": 1.5})
    with pytest.raises(EmbedTuneError, match="embed_ft"):
        as_embed_ft_config({"no_such_key": 1})


def test_resolve_embedder_takes_a_model_folder_and_refuses_an_empty_one(tmp_path, tuned):
    from ragtune.models import ModelNotFoundError, resolve_embedder

    result, _ = tuned
    assert resolve_embedder(str(result.path)) == str(result.path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        resolve_embedder(str(tmp_path / "empty"))


def test_mining_skips_what_cannot_train_and_keeps_only_negatives_without_the_answer(tuned, towns):
    from ragtune.types import QARecord

    retriever = Retriever.from_config(base_rcfg(towns))
    src = "towns/cadogan.txt"
    records = [
        QARecord("Who runs the council in Arvel?", "", source="towns/arvel.txt"),  # unanswerable
        QARecord("What is Cadogan's motto?", "Onward together", source=src),  # not in the corpus
        QARecord("Which water passes Cadogan?", "Fennick", source=src),
        QARecord("When do traders gather in Holm?", "October", source="towns/holm.txt"),
    ]
    rows = mine_triplets(records, retriever, negatives=3, fetch_k=8, progress=False)
    assert [r.query for r in rows] == [records[2].instruction, records[3].instruction]
    fennick = rows[0]
    assert "Fennick" in fennick.positive.text and fennick.source == src
    assert fennick.answer == "Fennick" and len(fennick.negatives) == 3
    assert not any("Fennick" in c.text for c in fennick.negatives)
    assert fennick.positive.id not in {c.id for c in fennick.negatives}


def test_recall_summary_renames_the_evaluators_keys_and_rounds_to_four_places():
    metrics = {
        "val_cosine_accuracy@1": 0.123456,
        "val_cosine_accuracy@10": 1.0,
        "val_cosine_mrr@10": 0.5,
        "val_cosine_ndcg@10": 0.3,  # not reported
    }
    assert recall_summary(metrics, "val_") == {"mrr@10": 0.5, "recall@1": 0.1235, "recall@10": 1.0}


class _PromptedModel:
    def __init__(self, prompts):
        self.prompts = prompts


def test_training_prompts_use_the_models_own_query_and_passage_prompts():
    cols = ["anchor", "positive", "negative_1"]
    e5 = _PromptedModel({"query": "query: ", "passage": "passage: ", "other": "x"})
    assert training_prompts(e5, cols) == {
        "anchor": "query: ",
        "positive": "passage: ",
        "negative_1": "passage: ",
    }
    assert training_prompts(_PromptedModel({"query": "q: "}), cols) == {"anchor": "q: "}
    assert training_prompts(_PromptedModel({"document": "d: "}), cols) == {
        "positive": "d: ",
        "negative_1": "d: ",
    }
    assert training_prompts(_PromptedModel({}), cols) == {}


def test_run_embed_ft_refuses_a_used_folder_before_indexing_and_caps_the_records(
    towns, tmp_path, monkeypatch
):
    import ragtune.ingest
    import ragtune.training.embedder as embedder

    indexed, tuned_on = [], []
    monkeypatch.setattr(ragtune.ingest, "ingest_corpus", lambda cfg: indexed.append(cfg))
    monkeypatch.setattr(Retriever, "from_config", classmethod(lambda cls, rcfg: "retriever"))

    def fake_tune(records, retriever, ecfg, **kw):
        tuned_on.append((records, retriever, kw))
        return "result"

    monkeypatch.setattr(embedder, "tune_embedder", fake_tune)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("a file already there")
    cfg = compose(
        "embed_ft", [*overrides(towns), f"output_dir={tmp_path}", f"embed_ft.save_dir={used}"]
    )
    with pytest.raises(EmbedTuneError, match="written once"):
        run_embed_ft(cfg)
    assert indexed == [] and (used / "keep.txt").exists()  # refused before the slow steps

    cfg = compose("embed_ft", [*overrides(towns), f"output_dir={tmp_path}", "data.max_records=4"])
    assert run_embed_ft(cfg) == "result" and len(indexed) == 1
    records, retriever, kw = tuned_on[0]
    assert len(records) == 4 and retriever == "retriever"
    assert kw["save_dir"] == tmp_path / "embedder"
    assert kw["work_dir"] == tmp_path / "embed_checkpoints"
