"""Tokenizer, dataset format, and the (seed, step) -> batch sampler."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fax.config import ConfigError, load_config
from fax.cluster.data import tokenize_on_ray
from fax.train.loop import Trainer
from fax.data import ByteTokenizer, Sampler, TokenDataset, document_segments, prepare, stdlib_dir, text_files


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
    index = prepare(text_files([tmp_path / "in"]), tmp_path / "ds", invalid_utf8="skip")
    assert index["num_documents"] == 2 and index["num_tokens"] == 7 and index["files_without_text"] == 1
    ds = TokenDataset.open(tmp_path / "ds")
    assert list(ds.tokens) == [97, 98, 99, 256, 100, 101, 256]
    assert json.loads((tmp_path / "ds" / "index.json").read_text())["format"] == "fax-tokens-v1"


def test_prompts_are_marked_as_context(tmp_path):
    """--prompt-field: a record's prompt tokens carry PROMPT_FLAG on disk (out of a batch's loss mask),
    its text and end-of-document id do not; a record without text is dropped, one without the field refused."""
    records = [{"q": "hi ", "a": "yo"}, {"q": "", "a": "z"}, {"q": "x", "a": ""}, {"q": None, "a": "w"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    index = prepare([tmp_path / "sft.jsonl"], tmp_path / "ds", text_field="a", prompt_field="q")
    assert index["num_documents"] == 3 and index["dtype"] == "uint32"
    flag = 1 << 31
    assert list(TokenDataset.open(tmp_path / "ds").tokens) == [
        flag | 104, flag | 105, flag | 32, 121, 111, 256, 122, 256, 119, 256]
    batch = Sampler(TokenDataset.open(tmp_path / "ds"), 1, 9, seed=0).batch(0)  # the one window there is
    assert batch.tokens.dtype == np.int32
    assert batch.tokens[0].tolist() == [104, 105, 32, 121, 111, 256, 122, 256, 119, 256]
    assert batch.loss_mask[0].tolist() == [False] * 3 + [True] * 7
    with pytest.raises(ValueError, match=r"sft.jsonl:1: no field 'prompt'; set --prompt-field"):
        prepare([tmp_path / "sft.jsonl"], tmp_path / "ds2", text_field="a", prompt_field="prompt")


def test_conversations_train_on_what_the_assistant_says(tmp_path):
    """--messages-field: a conversation's tokens are all read, but only the assistant's messages and
    the end-of-turn markers closing them are trained on; JSONL and Parquet alike; bad messages are
    refused with the record and the problem; a conversation without a reply is dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    talk = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"},
            {"role": "assistant", "content": "!"}]
    records = [{"messages": talk}, {"messages": [{"role": "user", "content": "no reply"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")

    def read(text: str) -> list[int]:
        return [(1 << 31) | b for b in text.encode()]

    def trained(text: str) -> list[int]:
        return list(text.encode())

    expected = (read("<|system|>\ns<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n") + trained("yo<|end|>")
                + read("\n<|user|>\n?<|end|>\n<|assistant|>\n") + trained("!<|end|>") + read("\n") + [256])
    for name in ("chat.jsonl", "chat.parquet"):
        index = prepare([tmp_path / name], tmp_path / name.replace(".", "_"), messages_field="messages")
        assert index["num_documents"] == 1
        assert list(TokenDataset.open(tmp_path / name.replace(".", "_")).tokens) == expected

    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: messages\[1\].role must be one of system, user, assistant, "
                                         r"got 'bot' \(field 'messages'\)"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "bad", messages_field="messages")
    with pytest.raises(ValueError, match="not both: set one"):
        prepare([tmp_path / "chat.jsonl"], tmp_path / "both", prompt_field="q", messages_field="messages")


def test_prepare_refuses_empty_input_and_leaves_no_index(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        prepare([tmp_path / "empty.txt"], tmp_path / "ds")
    assert not (tmp_path / "ds" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_files([tmp_path / "missing"])


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_prepare_command_names_the_bad_record_on_either_engine(tmp_path, capsys, engine):
    """A record the options do not fit is a one-line error naming its file and line (from a Ray
    worker too), exit 2, and no index."""
    from fax.cli import main

    cases = [('{"text": oops}', "not valid JSON (Expecting value, column 10)"),
             ('{"txt": "b"}', "no field 'text'; set --text-field"),
             ('["a"]', "a record must be a JSON object of fields, got list")]
    for n, (line, message) in enumerate(cases if engine == "local" else cases[1:2]):  # Ray: ~9 s a start
        bad = tmp_path / f"bad{n}.jsonl"
        bad.write_text('{"text": "a"}\n' + line + "\n")
        assert main(["prepare", str(bad), "--out", str(tmp_path / "ds"), "--engine", engine]) == 2
        assert f"fax: error: {bad}:2: {message}\n" in capsys.readouterr().err
        assert not (tmp_path / "ds" / "index.json").exists()


def refusals(tmp_path):
    """Inputs `fax prepare` refuses, each with (extra arguments, the words of its one-line error)."""
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "good.txt").write_text("fine text\n")
    (tmp_path / "mixed" / "one_bad_byte.txt").write_bytes(b"almost fine \xff text\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (tmp_path / "a_file").write_text("x")
    return [([str(tmp_path / "blob.bin")], f"{tmp_path / 'blob.bin'}: not UTF-8 text (byte 0xff at offset 0)"),
            ([str(tmp_path / "mixed")], f"{tmp_path / 'mixed' / 'one_bad_byte.txt'}: not UTF-8 text (byte 0xff at "
                                        "offset 12); convert it, leave it out (--suffix), or pass --invalid-utf8"),
            ([str(tmp_path / "empty.txt")], "no text found in 1 input file(s)"),
            ([str(tmp_path / "empty.jsonl")], "no text found in 1 input file(s)"),
            ([str(tmp_path / "deep.jsonl")], "deep.jsonl:1: the record nests JSON too deeply"),
            ([str(tmp_path / "mixed"), "--tokenizer", str(tmp_path / "blob.bin")],
             f"--tokenizer {tmp_path / 'blob.bin'}: not a tokenizer.json"),
            ([str(tmp_path / "mixed"), "--val-fraction", "-0.5"], "--val-fraction must be in [0, 1), got -0.5"),
            ([str(tmp_path / "mixed"), "--tokenizer", "bpe", "--vocab-size", "0"], "--vocab-size must be at least 257"),
            ([str(tmp_path / "missing")], "does not exist")]


def test_prepare_refusals_say_why_in_a_line_and_leave_nothing_behind(tmp_path, capsys):
    """Each refusal left shards (and a refused tokenizer) behind, some were tracebacks, some were
    accepted; a file with one invalid byte was dropped without a word. Now each is a one-line error
    (exit 2) and the output folder is as it was: absent, or a dataset's files unchanged."""
    from fax.cli import main

    (tmp_path / "inputs").mkdir()
    dataset = tmp_path / "dataset"
    assert main(["prepare", str(stdlib_dir() / "textwrap.py"), "--out", str(dataset), "--engine", "local"]) == 0
    def files(folder):
        return {p: p.is_file() and p.stat().st_mtime_ns for p in folder.rglob("*")}

    before = files(dataset)
    for args, message in refusals(tmp_path / "inputs"):
        for out in (tmp_path / "new", dataset):
            capsys.readouterr()
            assert main(["prepare", *args, "--out", str(out), "--engine", "local"]) == 2, args
            err = capsys.readouterr().err
            said = [line for line in err.splitlines() if "fax: error:" in line]
            assert len(said) == 1 and message in said[0] and "Traceback" not in err, err
            assert not (tmp_path / "new").exists()
            assert files(dataset) == before
    assert main(["prepare", str(stdlib_dir() / "textwrap.py"), "--out", str(tmp_path / "inputs" / "a_file")]) == 2
    assert f"--out {tmp_path / 'inputs' / 'a_file'} is a file; name a folder" in capsys.readouterr().err
    # Undecodable bytes replaced and counted, or the file skipped and counted, when asked.
    mixed = str(tmp_path / "inputs" / "mixed")
    assert main(["prepare", mixed, "--out", str(tmp_path / "replaced"), "--engine", "local", "--invalid-utf8",
                 "replace"]) == 0
    assert "1 undecodable byte sequences replaced" in capsys.readouterr().out
    assert "almost fine \ufffd text" in ByteTokenizer().decode(TokenDataset.open(tmp_path / "replaced").tokens.tolist())
    assert main(["prepare", mixed, "--out", str(tmp_path / "skipped"), "--engine", "local", "--invalid-utf8",
                 "skip"]) == 0
    assert "1 of 2 files without text, skipped" in capsys.readouterr().out


def test_sampler_depends_only_on_seed_and_step(small_corpus):
    ds = TokenDataset.open(small_corpus)
    a, b = Sampler(ds, 8, 64, seed=3), Sampler(ds, 8, 64, seed=3)
    for step in (0, 5, 1234):
        np.testing.assert_array_equal(a.batch(step).tokens, b.batch(step).tokens)
    assert not np.array_equal(a.batch(0).tokens, a.batch(1).tokens)
    assert not np.array_equal(a.batch(0).tokens, Sampler(ds, 8, 64, seed=4).batch(0).tokens)
    batch = a.batch(7)
    assert batch.shape == (8, 65) and batch.tokens.dtype == np.int32


def test_restart_yields_the_uninterrupted_batches(small_corpus):
    ds = TokenDataset.open(small_corpus)
    straight = Sampler(ds, 4, 32, seed=0).batches()
    uninterrupted = [next(straight) for _ in range(10)]
    resumed = Sampler(ds, 4, 32, seed=0).batches(start=6)
    for k in range(6, 10):
        np.testing.assert_array_equal(next(resumed).tokens, uninterrupted[k].tokens)


def test_batches_are_windows_of_the_corpus(small_corpus):
    ds = TokenDataset.open(small_corpus)
    batch = Sampler(ds, 4, 16, seed=1).batch(0).tokens
    flat = np.asarray(ds.tokens)
    for row in batch:
        starts = np.flatnonzero(flat[: len(flat) - 16] == row[0])
        assert any(np.array_equal(flat[s:s + 17], row) for s in starts)


def test_sampler_numbers_the_documents_of_each_row(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(30):
        (tmp_path / "in" / f"{i}.txt").write_text(f"note {i} " * (i % 4 + 1))
    prepare(text_files([tmp_path / "in"]), tmp_path / "ds")
    ds = TokenDataset.open(tmp_path / "ds")
    plain = Sampler(ds, 8, 32, seed=0).batch(0)
    packed = Sampler(ds, 8, 32, seed=0, document_end=ByteTokenizer.eos_id).batch(0)
    np.testing.assert_array_equal(plain.tokens, packed.tokens)
    assert not plain.segments.any()  # not told the end id: one document a row
    ends = plain.tokens == ByteTokenizer.eos_id
    assert ends.sum() >= 8  # documents of 7-32 bytes: several ends per row
    for row, segments in zip(plain.tokens, packed.segments):
        # a document's end token is its last: the segment goes up by one right after each end, and only there
        np.testing.assert_array_equal(np.diff(segments), (row == ByteTokenizer.eos_id)[:-1].astype(np.int32))
        assert segments[0] == 0
    np.testing.assert_array_equal(packed.segments, document_segments(plain.tokens, ByteTokenizer.eos_id))


def mixed_folder(root):
    """Text, JSONL and Parquet files, and one binary file that holds no text (skipped: prepare with
    invalid_utf8="skip")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    (root / "notes.txt").write_text("plain text, one document ✓\n")
    (root / "sub").mkdir()
    (root / "sub" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * (i + 1), "id": i})
                                                       for i in range(40)) + "\n")
    pq.write_table(pa.table({"text": [f"parquet row {i}: " + "xyz " * i for i in range(30)]}), root / "t.parquet")
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00")
    for i in range(6):
        (root / f"doc{i}.md").write_text(f"# doc {i}\n" + "lorem ipsum " * (10 * i + 1))
    return root


def test_prepare_on_ray_data_equals_one_process_and_reruns_skip_what_is_done(tmp_path):
    ray_folders = set(Path(tempfile.gettempdir()).glob("fax-ray-*"))
    files = text_files([mixed_folder(tmp_path / "in")])
    local = prepare(files, tmp_path / "local", val_fraction=0.25, invalid_utf8="skip")
    on_ray = prepare(files, tmp_path / "ray", val_fraction=0.25, invalid_utf8="skip", tokenize=tokenize_on_ray)
    for name in ("tokens.bin", "val.bin"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert {k: v for k, v in local.items()} == on_ray
    assert local["num_documents"] + local["val_documents"] == 1 + 40 + 30 + 6 and local["val_documents"] > 0
    assert local["files_without_text"] == 1
    assert set(Path(tempfile.gettempdir()).glob("fax-ray-*")) == ray_folders  # Ray's files went with its cluster
    # Documents in input order, each ended by the end-of-document id.
    first = bytes(TokenDataset.open(tmp_path / "local").tokens[:5].astype(np.uint8))
    assert first in (b"# doc", b"plain")
    # A re-run with nothing changed returns at once; a changed file is the only one tokenized again.
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "local" / "shards").iterdir()}
    assert prepare(files, tmp_path / "local", val_fraction=0.25, invalid_utf8="skip") == local
    (tmp_path / "in" / "notes.txt").write_text("changed text\n")
    again = prepare(files, tmp_path / "local", val_fraction=0.25, invalid_utf8="skip")
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "local" / "shards").iterdir()}
    assert len(set(after) - set(shards)) == 1 and all(after[n] == t for n, t in shards.items() if n in after)
    assert again["num_tokens"] + again["val_tokens"] != local["num_tokens"] + local["val_tokens"]


def test_bpe_tokenizer_round_trips_the_corpus_and_travels_with_the_data(tmp_path):
    from fax.data import HFTokenizer, read_documents

    files = text_files([mixed_folder(tmp_path / "in")], suffixes=(".txt", ".jsonl", ".parquet", ".md"))
    index = prepare(files, tmp_path / "bpe", "bpe", vocab_size=400)
    assert index["tokenizer"] == "tokenizer.json" and 256 < index["vocab_size"] <= 400  # merges the corpus has
    tok = HFTokenizer(tmp_path / "bpe" / "tokenizer.json")
    docs = [text for f in files for doc in read_documents(f) for text, _ in doc]
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    assert index["num_tokens"] < sum(len(d.encode()) for d in docs) / 1.5  # merges shorten the text
    # Any tokenizer.json (e.g. one shipped with a Hugging Face checkpoint) gives the same tokens.
    copied = prepare(files, tmp_path / "from_file", str(tmp_path / "bpe" / "tokenizer.json"))
    assert (tmp_path / "from_file" / "tokens.bin").read_bytes() == (tmp_path / "bpe" / "tokens.bin").read_bytes()
    assert copied["vocab_size"] == index["vocab_size"]
    # A model with fewer token ids than the tokenizer is refused (its embedding lookups would clamp).
    small = load_config(overrides=["model=gpt-tiny", "model.vocab_size=300", f"data.path={tmp_path / 'bpe'}",
                                   f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"the dataset's tokenizer has {index['vocab_size']} tokens but "
                                          r"model.vocab_size=300; raise model.vocab_size"):
        Trainer(small)  # checked where the dataset is opened, before anything compiles
    with pytest.raises(ValueError, match="tokenizer 'nope.json'"):
        prepare(files, tmp_path / "bad", "nope.json")
