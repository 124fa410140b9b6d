"""Tokenizer, dataset format, and the (seed, step) -> batch sampler."""

import json

import numpy as np
import pytest

from fax.data import ByteTokenizer, Sampler, TokenDataset, prepare, text_files


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'ünïcödé' + x  # ✓\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, tok.eos_id]) == "hi"


def test_prepare_writes_documents_separated_by_eos(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("abc")
    (tmp_path / "in" / "b.txt").write_text("de")
    (tmp_path / "in" / "skip.bin").write_bytes(b"\xff\xfe\x00")
    index = prepare(text_files([tmp_path / "in"]), tmp_path / "ds")
    assert index["num_documents"] == 2 and index["num_tokens"] == 7
    ds = TokenDataset.open(tmp_path / "ds")
    assert list(ds.tokens) == [97, 98, 99, 256, 100, 101, 256]
    assert json.loads((tmp_path / "ds" / "index.json").read_text())["format"] == "fax-tokens-v1"


def test_prepare_refuses_empty_input_and_leaves_no_index(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        prepare([tmp_path / "empty.txt"], tmp_path / "ds")
    assert not (tmp_path / "ds" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_files([tmp_path / "missing"])


def test_sampler_depends_only_on_seed_and_step(small_corpus):
    ds = TokenDataset.open(small_corpus)
    a, b = Sampler(ds, 8, 64, seed=3), Sampler(ds, 8, 64, seed=3)
    for step in (0, 5, 1234):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    assert not np.array_equal(a.batch(0), a.batch(1))
    assert not np.array_equal(a.batch(0), Sampler(ds, 8, 64, seed=4).batch(0))
    batch = a.batch(7)
    assert batch.shape == (8, 65) and batch.dtype == np.int32


def test_restart_yields_the_uninterrupted_batches(small_corpus):
    ds = TokenDataset.open(small_corpus)
    straight = Sampler(ds, 4, 32, seed=0).batches()
    uninterrupted = [next(straight) for _ in range(10)]
    resumed = Sampler(ds, 4, 32, seed=0).batches(start=6)
    for k in range(6, 10):
        np.testing.assert_array_equal(next(resumed), uninterrupted[k])


def test_batches_are_windows_of_the_corpus(small_corpus):
    ds = TokenDataset.open(small_corpus)
    batch = Sampler(ds, 4, 16, seed=1).batch(0)
    flat = np.asarray(ds.tokens)
    for row in batch:
        starts = np.flatnonzero(flat[: len(flat) - 16] == row[0])
        assert any(np.array_equal(flat[s:s + 17], row) for s in starts)
