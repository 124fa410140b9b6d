"""Prepared datasets as training batches: the default corpus, checks, memory-mapped splits, the sampler."""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fax.config import Config
from fax.data.files import text_files
from fax.data.prepare import FORMAT, PROMPT_FLAG, prepare
from fax.data.tokenizers import Tokenizer, get_tokenizer


class Batch(NamedTuple):
    """Rows of ``seq_len + 1`` tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``), as the head splits
    them among hosts (every field's leading axis is the row).

    ``loss_mask``: whether a token counts as a target (a prompt's tokens do not). ``segments``:
    which packed document of its row each token belongs to, counted from 0; the step reads them
    under ``data.document_mask`` (a token attends only to its own document, whose positions count
    from its first token) and otherwise ignores them.
    """

    tokens: np.ndarray  # int32 [rows, seq_len + 1]
    loss_mask: np.ndarray  # bool [rows, seq_len + 1]
    segments: np.ndarray  # int32 [rows, seq_len + 1]

    @classmethod
    def of(cls, tokens: np.ndarray, loss_mask: np.ndarray | None = None,
           segments: np.ndarray | None = None) -> Batch:
        """Rows of plain token ids: every token counted, one document a row, unless told otherwise."""
        tokens = np.asarray(tokens, np.int32)
        return cls(tokens, np.ones(tokens.shape, bool) if loss_mask is None else np.asarray(loss_mask, bool),
                   np.zeros(tokens.shape, np.int32) if segments is None else np.asarray(segments, np.int32))

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape


def document_segments(tokens: np.ndarray, end_id: int) -> np.ndarray:
    """Each token's document index in its row [rows, length]: a document's end-of-document token is
    its last, the next token starts another."""
    ends = (tokens == end_id).astype(np.int32)
    return (np.cumsum(ends, axis=1) - ends).astype(np.int32)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def cache_dir() -> Path:
    """Where fax keeps what it derives once per machine (the default corpus): $FAX_CACHE, else ~/.cache/fax."""
    return Path(os.environ.get("FAX_CACHE", Path.home() / ".cache" / "fax"))


def default_corpus() -> Path:
    """The running interpreter's standard library sources, tokenized once into a cache folder, 2%
    of the files held out as the validation split."""
    out = cache_dir() / f"stdlib-{sysconfig.get_python_version()}-byte-val"
    if not (out / "index.json").exists():
        root = stdlib_dir()
        files = [f for f in text_files([root], (".py",))
                 if not ({"site-packages", "test", "tests", "idle_test"} & set(f.relative_to(root).parts))]
        prepare(files, out, val_fraction=0.02, invalid_utf8="skip")  # as before the setting: a few are Latin-1
    return out


def dataset_path(path: str) -> Path:
    """A ``data.path`` setting as a folder: empty means the standard-library corpus."""
    return Path(path) if path else default_corpus()


def dataset_problems(path: str | Path, seq_len: int, vocab_size: int) -> list[str]:
    """Why a prepared dataset cannot feed sequences of ``seq_len`` to a model of ``vocab_size`` tokens."""
    index = Path(path) / "index.json"
    if not Path(path).exists():
        return [f"data.path={str(path)!r} does not exist; run `fax prepare FILES --out DIR` first"]
    if not index.exists():
        return [f"data.path={str(path)!r} holds no prepared dataset (index.json missing); "
                "run `fax prepare FILES --out DIR`"]
    meta = json.loads(index.read_text())
    if meta.get("format") != FORMAT:
        return [f"data.path={str(path)!r}: unknown dataset format {meta.get('format')!r}; re-run `fax prepare`"]
    if meta["num_tokens"] < seq_len + 1:
        return [f"data.path={str(path)!r} holds {meta['num_tokens']} tokens, fewer than one sequence of "
                f"train.seq_len+1={seq_len + 1}; add text or lower train.seq_len"]
    if meta["vocab_size"] > vocab_size:
        return [f"the dataset's tokenizer has {meta['vocab_size']} tokens but model.vocab_size={vocab_size}; "
                "raise model.vocab_size"]
    return []


def open_split(path_setting: str, split: str, seq_len: int, vocab_size: int) -> tuple[Path, TokenDataset | None,
                                                                                    list[str]]:
    """The folder ``data.path`` names, its ``split`` opened, and why it cannot feed sequences of
    ``seq_len`` to a model of ``vocab_size`` tokens (empty: it can; the dataset is None otherwise)."""
    path = dataset_path(path_setting)
    problems = dataset_problems(path, seq_len, vocab_size)
    data = None if problems else TokenDataset.open(path, split)
    if data is not None and len(data.tokens) < seq_len + 1:
        problems.append(f"the {split} split of data.path={str(path)!r} holds {len(data.tokens)} tokens, fewer than "
                        f"one sequence ({seq_len + 1}); pick another data.path or split, or lower train.seq_len")
        data = None
    return path, data, problems


@dataclass(frozen=True)
class TokenDataset:
    tokens: np.ndarray  # memory-mapped
    meta: dict

    @classmethod
    def open(cls, path: str | Path, split: str = "train") -> TokenDataset:
        """The training tokens, or with ``split="val"`` the validation split."""
        path = Path(path)
        meta = json.loads((path / "index.json").read_text())
        count = meta["num_tokens"] if split == "train" else meta.get("val_tokens", 0)
        name = "tokens.bin" if split == "train" else "val.bin"
        tokens = np.memmap(path / name, dtype=meta["dtype"], mode="r", shape=(count,)) if count else np.zeros(0)
        return cls(tokens, meta)

    def tokenizer(self, folder: str | Path) -> Tokenizer:
        return get_tokenizer(self.meta["tokenizer"], folder)

    def sampler(self, folder: str | Path, config: Config) -> Sampler:
        """The batches ``config`` trains (or evaluates) on from this split (``folder``: the dataset's,
        where its tokenizer is kept); its rows' documents numbered only under ``data.document_mask``,
        the one setting that reads them."""
        end = self.tokenizer(folder).eos_id if config.data.document_mask else None
        return Sampler(self, config.train.batch_size, config.seq_len, config.seed, end)


class Sampler:
    """Random windows of ``seq_len + 1`` tokens; the batch of step s depends only on (seed, s).

    That makes resume and failure recovery exact: restarting at step k yields the same batches
    k, k+1, ... as an uninterrupted run, and no host's clock or iteration history matters.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int,
                 document_end: int | None = None):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.document_end = document_end  # the end-of-document id, where segments change (None: one a row)
        self.n_starts = len(dataset.tokens) - seq_len  # valid window starts

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.n_starts, size=self.batch_size)
        offsets = starts[:, None] + np.arange(self.seq_len + 1)
        stored = np.asarray(self.dataset.tokens[offsets]).astype(np.uint32)  # uint16 or uint32 on disk
        tokens = (stored & np.uint32(PROMPT_FLAG - 1)).astype(np.int32)
        segments = np.zeros(tokens.shape, np.int32) if self.document_end is None else \
            document_segments(tokens, self.document_end)
        return Batch(tokens, (stored & np.uint32(PROMPT_FLAG)) == 0, segments)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        step = start
        while True:
            yield self.batch(step)
            step += 1
