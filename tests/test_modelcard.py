"""The model folder's own rules (ragtune/modelcard.py): which folder is the model, whether it is
a trained one, and where its training facts come from; the serving overlay itself is tested
through the pipeline (tests/test_rag.py, tests/test_tampering.py)."""

from __future__ import annotations

import json

from ragtune.manifest import MANIFEST
from ragtune.modelcard import (
    TRAIN_INFO,
    is_trained_folder,
    model_folder,
    read_json,
    train_info,
)
from ragtune.schema import SCHEMA_FILE


def test_a_json_file_that_is_not_an_object_reads_as_empty(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json(tmp_path / "list.json") == {} == read_json(tmp_path / "bad.json")
    assert read_json(tmp_path / "missing.json") == {}


def test_a_run_folder_leads_to_its_model_but_a_model_folder_stays_itself(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / MANIFEST).write_text("{}")
    assert model_folder(run) == (run / "model").resolve()
    (run / MANIFEST).write_text("{}")  # the folder given is itself a model: never descend
    assert model_folder(run) == run.resolve()


def test_a_folder_with_only_its_prompt_schema_is_still_a_trained_one(tmp_path):
    assert not is_trained_folder(tmp_path)
    (tmp_path / SCHEMA_FILE).write_text("{}")
    assert is_trained_folder(tmp_path)


def test_training_facts_come_from_the_train_record_before_the_manifest(tmp_path):
    (tmp_path / TRAIN_INFO).write_text(json.dumps({"backend": "unsloth"}))
    manifest = {"backend": "transformers", "save_method": "merged_16bit", "base_model": "b"}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    info = train_info(tmp_path)
    assert info == {"backend": "unsloth", "save_method": "merged_16bit", "base_model": "b"}


def test_a_setting_the_user_named_or_whose_group_they_chose_wins_over_the_manifest():
    from ragtune.modelcard import is_explicit, model_settings

    assert is_explicit("retriever.k", ["retriever"]) and is_explicit("retriever.k", ["retriever.k"])
    assert not is_explicit("retriever.k", ["retriever.fetch_k", "retrievers"])
    trained = {"model": {"max_seq_length": 512, "dtype": "bfloat16", "trust_remote_code": True}}
    mine = {"max_seq_length": 2048, "dtype": "float32"}
    got = model_settings(mine, trained, explicit=["model.max_seq_length"])
    # as trained unless named; a manifest never switches on remote code
    assert got == {"max_seq_length": 2048, "dtype": "bfloat16", "trust_remote_code": False}
    assert model_settings(mine, trained)["max_seq_length"] == 512


def test_the_trained_retriever_settings_apply_but_not_the_training_machine_s(tmp_path):
    """k and chunking come from the manifest; the embedder's device and batch size are the
    serving machine's (a model trained on a GPU is served on a CPU); an unknown index mode is
    refused."""
    import pytest

    from ragtune.config import RetrieverConfig
    from ragtune.modelcard import retriever_settings

    mine = RetrieverConfig(device="cpu", batch_size=8, persist_dir=str(tmp_path))
    trained = {"retriever": {"device": "cuda", "batch_size": 512, "k": 7, "chunk_size": 333}}
    got = retriever_settings(mine, trained, index="own")
    assert (got.device, got.batch_size, got.k, got.chunk_size) == ("cpu", 8, 7, 333)
    with pytest.raises(ValueError, match="index must be 'trained' or 'own'"):
        retriever_settings(mine, trained, index="theirs")


def test_the_trained_index_is_used_while_it_exists_and_its_collection_unless_rechunked(tmp_path):
    """Serving opens the collection and index folder the model was trained on; a folder that is
    gone (the model copied to another machine) leaves the configured one, and chunk settings
    the user named leave the collection to be found by those settings."""
    from ragtune.config import RetrieverConfig
    from ragtune.modelcard import retriever_settings

    mine = RetrieverConfig(persist_dir=str(tmp_path / "mine"))
    there = tmp_path / "trained_index"
    there.mkdir()
    trained = {"retriever": {"collection": "c_trained", "persist_dir": str(there)}}
    got = retriever_settings(mine, trained)
    assert (got.collection, got.persist_dir) == ("c_trained", str(there))
    gone = {"retriever": {"persist_dir": str(tmp_path / "gone")}}
    assert retriever_settings(mine, gone).persist_dir == str(tmp_path / "mine")
    rechunked = retriever_settings(mine, trained, ["retriever.chunk_size"])
    assert rechunked.collection == mine.collection != "c_trained"


def test_a_chroma_server_the_user_names_wins_over_the_trained_one(tmp_path):
    from ragtune.config import RetrieverConfig
    from ragtune.modelcard import retriever_settings

    mine = RetrieverConfig(server="http://127.0.0.1:8001", persist_dir=str(tmp_path))
    trained = {"retriever": {"server": "http://10.0.0.5:8000"}}
    assert retriever_settings(mine, trained, ["retriever.server"]).server == mine.server
    assert retriever_settings(mine, trained).server == "http://10.0.0.5:8000"


def test_a_damaged_folder_is_named_by_its_first_problem_and_how_many_more(tmp_path):
    import pytest

    from ragtune.manifest import ManifestError
    from ragtune.modelcard import check_files

    files = {"a.bin": {"bytes": 1, "sha256": "x"}, "b.bin": {"bytes": 1, "sha256": "y"}}
    with pytest.raises(ManifestError, match=r"a\.bin is missing \(and 1 more\)$"):
        check_files(tmp_path, {"files": files}, allow_mismatch=False)
