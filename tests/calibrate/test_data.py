import json

import pytest

from dscompress.calibrate.data import Corpus, make_blocks, split_texts
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.errors import DataError
from dscompress.models.tiny import byte_tokenizer


def test_splits_are_disjoint_deterministic_and_cover_the_corpus():
    spec = DataSpec()
    a, b = split_texts(spec), split_texts(spec)
    assert a == b
    sets = [set(a[name]) for name in ("eval", "calibration", "train")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    total = sum(len(x) for x in sets)
    assert all(len(s) / total > 0.1 for s in sets)


def test_windows_have_fixed_shape_and_are_stable():
    spec = DataSpec(eval=SplitSpec(samples=5, seq_len=100))
    tok = byte_tokenizer()
    w1 = Corpus(spec, tok).windows("eval")
    assert w1.shape == (5, 100)
    assert (w1 == Corpus(spec, tok).windows("eval")).all()
    assert not (w1 == Corpus(spec, tok).windows("calibration")[:5, :100]).all()


def test_too_short_corpus(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("one short paragraph.\n\nanother one.\n")
    spec = DataSpec(source=str(path), fractions={"eval": 0.9, "calibration": 0.05, "train": 0.05},
                    eval=SplitSpec(samples=4, seq_len=512))  # fmt: skip
    with pytest.raises(DataError, match="too short.*Fix: lower data.eval.samples"):
        Corpus(spec, byte_tokenizer()).windows("eval")


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n   \n")
    with pytest.raises(DataError, match="the corpus is empty"):
        Corpus(DataSpec(source=str(path)), byte_tokenizer()).windows("eval")


def test_jsonl_source(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i} " * 200}) for i in range(60)))
    spec = DataSpec(source=str(path), text_field="body", eval=SplitSpec(samples=2, seq_len=64))
    assert Corpus(spec, byte_tokenizer()).windows("eval").shape == (2, 64)
    path.write_text('{"body": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid JSON"):
        Corpus(spec, byte_tokenizer()).windows("eval")
    path.write_text('{"text": "wrong field"}\n')
    with pytest.raises(DataError, match="no string field 'body'"):
        Corpus(spec, byte_tokenizer()).windows("eval")


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        Corpus(DataSpec(source=str(tmp_path / "x.txt")), byte_tokenizer()).windows("eval")


def test_blocks_respect_paragraphs():
    blocks = make_blocks(["a" * 1500 + "\n\n" + "b" * 1500, "c" * 10])
    assert blocks[0].endswith("b" * 1500) and blocks[-1] == "c" * 10
