"""Calibration text: local formats, window sampling, clear errors."""

import json

import pytest
import torch
from conftest import SAMPLE_TEXT

from calib import CalibrationDataError, eval_tokens, load_documents, sample_windows


@pytest.fixture
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_local_formats_agree(tmp_path):
    docs = ["first document text", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in docs]))
    import datasets

    ds = datasets.Dataset.from_dict({"text": docs})
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_documents(str(tmp_path / "a.txt"))[0] == ["\n\n".join(docs)]
    for name in ("a.jsonl", "a.json", "a.parquet", "saved"):
        assert load_documents(str(tmp_path / name))[0] == docs, name


def test_windows_are_seeded_and_shaped(tok):
    docs = [SAMPLE_TEXT]
    a = sample_windows(docs, tok, 6, 20, seed=1)
    b = sample_windows(docs, tok, 6, 20, seed=1)
    c = sample_windows(docs, tok, 6, 20, seed=2)
    assert a.shape == (6, 20) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(SAMPLE_TEXT, add_special_tokens=False).input_ids
    row = a[0].tolist()
    assert any(ids[s:s + 20] == row for s in range(len(ids) - 19))  # a real window of the text


def test_document_mode_draws_from_one_document(tok):
    docs = ["tiny", SAMPLE_TEXT[:2000], "also tiny"]
    w = sample_windows(docs, tok, 4, 16, seed=0, mode="documents")
    ids = tok(docs[1], add_special_tokens=False).input_ids
    for row in w.tolist():
        assert any(ids[s:s + 16] == row for s in range(len(ids) - 15))


def test_eval_tokens_non_overlapping(tok):
    w = eval_tokens([SAMPLE_TEXT], tok, 32, max_windows=3)
    ids = tok(SAMPLE_TEXT).input_ids
    assert w.shape == (3, 32) and w.flatten().tolist() == ids[:96]


def test_too_little_text_gives_numbers(tok):
    with pytest.raises(CalibrationDataError, match=r"has \d+ tokens.*--seqlen 4096"):
        sample_windows(["a short text"], tok, 4, 4096)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationDataError, match="empty"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(CalibrationDataError, match="no 'text' field"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_hub_unreachable_names_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CalibrationDataError, match=r"could not load the 'c4' dataset.*--dataset PATH.*\.jsonl"):
        load_documents("c4")


def test_unknown_name_and_missing_path():
    with pytest.raises(CalibrationDataError, match="unknown dataset 'c5'.*wikitext2, ptb, c4"):
        load_documents("c5")
    with pytest.raises(CalibrationDataError, match="no such file"):
        load_documents("./nope/data.jsonl")
