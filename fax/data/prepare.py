"""``fax prepare``: tokenize files into the on-disk token format a dataset folder holds.

Format of a prepared dataset folder: ``tokens.bin`` (flat uint16/uint32 tokens, each document
followed by the tokenizer's end-of-document id), ``val.bin`` (the validation split, same format),
``index.json`` (tokenizer, dtype, counts), ``tokenizer.json`` for a non-byte tokenizer, and
``shards/`` (one file's tokens each, what makes a re-run incremental). index.json is written last,
by rename, so a folder without it is never taken for a complete dataset.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fax.data import chat
from fax.data.files import INVALID_UTF8, read_documents, replaced_sequences, write_atomic
from fax.data.tokenizers import (HFTokenizer, Tokenizer, copy_tokenizer, fingerprint, get_tokenizer,
                                 tokenizer_fingerprint, train_bpe)

FORMAT = "fax-tokens-v1"
# Set on the tokens a document holds as context: a prompt, or a conversation's messages other than the
# assistant's (datasets prepared with a prompt or messages field, always uint32). The model reads them
# but is not trained to predict them. The sampler turns the flag into the batch's loss mask.
PROMPT_FLAG = 1 << 31
# (files still to tokenize: (path, shard key) pairs, the ShardWriter's arguments, a progress bar)
# -> None: how a dataset's files are tokenized, here or on a cluster (fax.cluster.data.tokenize_on_ray)
FileMapper = Callable[[list[tuple[str, str]], tuple, Any], None]


def tokenize_file(path: Path, tok: Tokenizer, layout: chat.Layout, dtype: np.dtype, text_field: str,
                  prompt_field: str = "", messages_field: str = "", invalid_utf8: str = "refuse"
                  ) -> tuple[np.ndarray, int]:
    """All documents of ``path`` (conversations in ``layout``), each followed by the end-of-document id,
    the tokens of what is not trained on marked with ``PROMPT_FLAG``; and how many documents there were."""
    docs = read_documents(path, text_field, prompt_field, messages_field, layout, invalid_utf8)
    encoded = iter(tok.encode_batch([text for doc in docs for text, _ in doc]))
    eos = np.array([tok.eos_id], dtype)
    parts = []
    for doc in docs:
        for _, trained in doc:
            ids = next(encoded).astype(dtype)
            parts.append(ids if trained else ids | dtype.type(PROMPT_FLAG))
        parts.append(eos)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), len(docs)




def _file_key(path: Path, tokenizer_id: str, text_field: str, prompt_field: str, messages_field: str,
              invalid_utf8: str) -> str:
    stat = path.stat()
    # plain text: the keys as before prompts and conversations
    fields = [text_field, prompt_field, messages_field] if prompt_field or messages_field else text_field
    handling = () if invalid_utf8 == "refuse" else (invalid_utf8,)  # (refuse: the keys as before the setting)
    return fingerprint(str(path.absolute()), stat.st_size, stat.st_mtime_ns, tokenizer_id, fields, *handling)




class ShardWriter:
    """Tokenizes one file into its shard (``shards/KEY-DOCS-REPLACED.npy``: its documents, and the
    undecodable byte sequences replaced in it); what Ray Data runs on its workers."""

    def __init__(self, out: str, tokenizer: str, dtype: str, text_field: str, prompt_field: str, messages_field: str,
                 invalid_utf8: str = "refuse"):
        self.out, self.dtype = Path(out), np.dtype(dtype)
        self.fields = (text_field, prompt_field, messages_field, invalid_utf8)
        self.tok = get_tokenizer(tokenizer, self.out)
        # a chat template matters to conversations only
        self.layout = chat.layout(self.tok) if messages_field else chat.FAX_LAYOUT

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The files' document counts, and for each its problem ("" when none): a file the options do
        not fit is reported, not raised, so that Ray hands the driver the message itself."""
        docs, errors = [], []
        for path, key in zip(batch["path"], batch["key"]):
            try:
                tokens, n = tokenize_file(Path(path), self.tok, self.layout, self.dtype, *self.fields)
            except ValueError as e:
                docs.append(0)
                errors.append(str(e))
                continue
            replaced = replaced_sequences(Path(path)) if self.fields[-1] == "replace" else 0
            buffer = io.BytesIO()
            np.save(buffer, tokens)
            write_atomic(self.out / "shards" / f"{key}-{n}-{replaced}.npy", buffer.getvalue())
            docs.append(n)
            errors.append("")
        return {"key": list(batch["key"]), "documents": docs, "error": errors}


def tokenize_here(todo: list[tuple[str, str]], writer_args: tuple, bar: Any) -> None:
    """The default ``FileMapper``: one file after another in this process."""
    writer = ShardWriter(*writer_args)
    for path, key in todo:
        refuse_file(writer({"path": [path], "key": [key]})["error"])
        bar.update(1)


def refuse_file(errors: Iterable[str]) -> None:
    """Raise the first problem a ``ShardWriter`` reported, as the file's own ValueError."""
    problem = next((e for e in errors if e), None)
    if problem:
        raise ValueError(problem)


def _shard(out: Path, key: str) -> Path | None:
    return next(iter((out / "shards").glob(f"{key}-*.npy")), None)




def option_problems(tokenizer: str, vocab_size: int, val_fraction: float, invalid_utf8: str) -> list[str]:
    found = []
    if not 0 <= val_fraction < 1:
        found.append(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if tokenizer == "bpe" and not 257 <= vocab_size < 2 ** 31:
        found.append(f"--vocab-size must be at least 257 (the 256 bytes and the end-of-text token), got {vocab_size}")
    if invalid_utf8 not in INVALID_UTF8:
        found.append(f"--invalid-utf8 must be one of {', '.join(INVALID_UTF8)}, got {invalid_utf8!r}")
    return found


@contextlib.contextmanager
def _nothing_left_on_failure(out: Path) -> Iterator[None]:
    """A refused or failed ``prepare`` leaves ``out`` as it found it: files it added (shards, a
    tokenizer) are removed, and the folder itself if it made it."""
    existed = {p for p in out.rglob("*")} if out.exists() else None
    try:
        yield
    except BaseException:
        added = {p for p in out.rglob("*")} - (existed or set()) if out.exists() else set()
        for path in sorted(added, key=lambda p: len(p.parts), reverse=True):  # files before their folders
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        if existed is None and out.exists():
            out.rmdir()
        raise


def prepare(files: list[Path], out_dir: str | Path, tokenizer: str = "byte", *, vocab_size: int = 8192,
            val_fraction: float = 0.0, text_field: str = "text", prompt_field: str = "", messages_field: str = "",
            invalid_utf8: str = "refuse", tokenize: FileMapper | None = None, progress: bool = False) -> dict:
    """Tokenize ``files`` into ``out_dir``; returns the index.

    ``tokenizer``: ``byte``, ``bpe`` (trained here on the files, ``vocab_size`` tokens) or a path to a
    ``tokenizer.json``; either of the last two is kept in the folder. ``tokenize``: how the files are
    tokenized (default: here, one after another; ``fax.cluster.data.tokenize_on_ray``: Ray Data). Each file's tokens land in a
    shard named by the file's path, size, mtime and tokenizer, so a re-run tokenizes only what
    changed; a re-run with nothing changed returns at once. Documents go to the validation split
    (``val.bin``) with probability ``val_fraction``, decided by their position alone, so both
    engines write the same bytes. With ``prompt_field`` each JSONL/Parquet record is a prompt and
    its ``text_field``, and only the text is trained on (the prompt's tokens carry ``PROMPT_FLAG``);
    with ``messages_field`` each is a conversation (``fax.data.chat``), and only the assistant's messages
    are trained on. A file that is not UTF-8 is handled as ``invalid_utf8`` says (``files.INVALID_UTF8``).
    ``index.json`` is written last; a refusal leaves the folder as it was.
    """
    problems = option_problems(tokenizer, vocab_size, val_fraction, invalid_utf8)
    if prompt_field and messages_field:
        problems.append("a record is a prompt and a text (--prompt-field) or a conversation (--messages-field), "
                        "not both: set one")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file; name a folder (new or a dataset's)")
    if not files:
        problems.append("no input files")
    if problems:
        raise ValueError("; ".join(problems))
    with _nothing_left_on_failure(out):
        (out / "shards").mkdir(parents=True, exist_ok=True)
        return _prepare(files, out, tokenizer, vocab_size, val_fraction, (text_field, prompt_field, messages_field),
                        invalid_utf8, tokenize, progress)


def _prepare(files: list[Path], out: Path, tokenizer: str, vocab_size: int, val_fraction: float,
             fields: tuple[str, str, str], invalid_utf8: str, tokenize: FileMapper | None, progress: bool) -> dict:
    prompt_field, messages_field = fields[1:]
    if tokenizer == "bpe":
        if not (out / HFTokenizer.name).exists():
            train_bpe((text for f in files for doc in read_documents(f, *fields, invalid_utf8=invalid_utf8)
                       for text, _ in doc), vocab_size, out / HFTokenizer.name)
        tokenizer = HFTokenizer.name
    elif tokenizer != "byte":
        source = Path(tokenizer)
        if not source.is_file():
            raise ValueError(f"tokenizer {tokenizer!r}: use byte, bpe, or the path of a tokenizer.json")
        try:
            HFTokenizer(source)
        except Exception as e:  # noqa: BLE001 - the tokenizers library's own errors, of several kinds
            raise ValueError(f"--tokenizer {source}: not a tokenizer.json the tokenizers library reads "
                             f"({str(e)[:120]})") from None
        copy_tokenizer(source, out)
        tokenizer = HFTokenizer.name
    tok = get_tokenizer(tokenizer, out)
    tokenizer_id = tokenizer if tokenizer == "byte" else tokenizer_fingerprint(out)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2 ** 16 and not (prompt_field or messages_field) else np.uint32)
    keys = [_file_key(f, tokenizer_id, *fields, invalid_utf8) for f in files]
    inputs_key = fingerprint(keys, val_fraction)
    index_path = out / "index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("fingerprint") == inputs_key:
        return json.loads(index_path.read_text())
    todo = [(str(f), k) for f, k in zip(files, keys) if _shard(out, k) is None]
    writer_args = (str(out), tokenizer, dtype.name, *fields, invalid_utf8)
    with tqdm(total=len(files), initial=len(files) - len(todo), desc="tokenize", unit="file",
              disable=not progress) as bar:
        if todo:
            (tokenize or tokenize_here)(todo, writer_args, bar)
    return _assemble(out, files, keys, tok, dtype, tokenizer, val_fraction, inputs_key)


def _assemble(out: Path, files: list[Path], keys: list[str], tok: Tokenizer, dtype: np.dtype, tokenizer: str,
              val_fraction: float, inputs_key: str) -> dict:
    """Concatenate the shards in input order into tokens.bin and val.bin, then write the index."""
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    without_text = replaced = 0
    tmp = {split: out / f"{split}.bin.tmp-{os.getpid()}" for split in counts}
    with open(tmp["train"], "wb") as train, open(tmp["val"], "wb") as val:
        for k, key in enumerate(keys):
            shard = _shard(out, key)
            documents, *replacements = map(int, shard.stem.split("-")[1:])
            without_text += documents == 0
            replaced += sum(replacements)  # (none in a shard of an older version)
            tokens = np.load(shard)
            ends = np.flatnonzero(tokens == tok.eos_id) + 1
            to_val = np.random.default_rng([k]).random(len(ends)) < val_fraction
            for doc, is_val in zip(np.split(tokens, ends[:-1]) if len(ends) else [], to_val):
                split = "val" if is_val else "train"
                (val if is_val else train).write(doc.tobytes())
                counts[split][0] += len(doc)
                counts[split][1] += 1
    if counts["train"][1] == 0:
        for t in tmp.values():
            t.unlink()
        raise ValueError(f"no text found in {len(files)} input file(s)" + (" outside the validation split"
                                                                          if counts["val"][1] else ""))
    (out / "index.json").unlink(missing_ok=True)  # the folder is incomplete until the new index lands
    os.replace(tmp["train"], out / "tokens.bin")
    os.replace(tmp["val"], out / "val.bin")
    index = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "dtype": dtype.name,
             "num_tokens": counts["train"][0], "num_documents": counts["train"][1],
             "val_tokens": counts["val"][0], "val_documents": counts["val"][1], "files": len(files),
             "files_without_text": without_text, "replaced_utf8": replaced, "fingerprint": inputs_key}
    write_atomic(out / "index.json", json.dumps(index, indent=2).encode())
    for stale in set((out / "shards").glob("*.npy")) - {_shard(out, k) for k in keys}:
        stale.unlink()  # shards of files no longer among the inputs (or changed since)
    return index


