"""Tokenizer, the on-disk token format, the embedded corpus, and the deterministic sampler.

Format of a prepared dataset folder: ``tokens.bin`` (flat uint16/uint32 tokens, documents
separated by the tokenizer's end-of-document id) and ``index.json``. index.json is written last,
by rename, so a folder without it is never taken for a complete dataset.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "fax-tokens-v1"


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; 256 ends a document."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def text_files(paths: Iterable[str | Path], suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Files named by ``paths``, folders walked recursively, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and (suffixes is None or f.suffix in suffixes))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
    return out


def prepare(files: list[Path], out_dir: str | Path, tokenizer: str = "byte") -> dict:
    """Tokenize ``files`` (one document each) into ``out_dir``; returns the index."""
    tok = get_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    eos = np.array([tok.eos_id], dtype)
    n_tokens = n_docs = 0
    (out / "index.json").unlink(missing_ok=True)  # the folder is incomplete until the new index lands
    tmp_tokens = out / f"tokens.bin.tmp-{os.getpid()}"
    with open(tmp_tokens, "wb") as f:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # not a text file
            ids = tok.encode(text).astype(dtype)
            if not len(ids):
                continue
            f.write(ids.tobytes())
            f.write(eos.tobytes())
            n_tokens += len(ids) + 1
            n_docs += 1
    if n_docs == 0:
        tmp_tokens.unlink()
        raise ValueError(f"no text found in {len(files)} input file(s)")
    os.replace(tmp_tokens, out / "tokens.bin")
    index = {"format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
             "num_tokens": n_tokens, "num_documents": n_docs}
    tmp = out / f"index.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / "index.json")
    return index


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus() -> Path:
    """The running interpreter's standard library sources, tokenized once into a cache folder."""
    cache = Path(os.environ.get("FAX_CACHE", Path.home() / ".cache" / "fax"))
    out = cache / f"stdlib-{sysconfig.get_python_version()}-byte"
    if not (out / "index.json").exists():
        root = stdlib_dir()
        files = [f for f in text_files([root], (".py",))
                 if not ({"site-packages", "test", "tests", "idle_test"} & set(f.relative_to(root).parts))]
        prepare(files, out)
    return out


def dataset_path(path: str) -> Path:
    """A ``data.path`` setting as a folder: empty means the standard-library corpus."""
    return Path(path) if path else default_corpus()


def dataset_problems(path: str | Path, seq_len: int) -> list[str]:
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
    return []


@dataclass(frozen=True)
class TokenDataset:
    tokens: np.ndarray  # memory-mapped
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        path = Path(path)
        meta = json.loads((path / "index.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
        return cls(tokens, meta)


class Sampler:
    """Random windows of ``seq_len + 1`` tokens; the batch of step s depends only on (seed, s).

    That makes resume and failure recovery exact: restarting at step k yields the same batches
    k, k+1, ... as an uninterrupted run, and no host's clock or iteration history matters.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.n_starts = len(dataset.tokens) - seq_len  # valid window starts

    def batch(self, step: int) -> np.ndarray:
        """int32 tokens [batch_size, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.n_starts, size=self.batch_size)
        offsets = starts[:, None] + np.arange(self.seq_len + 1)
        return np.asarray(self.dataset.tokens[offsets], dtype=np.int32)

    def batches(self, start: int = 0) -> Iterator[np.ndarray]:
        step = start
        while True:
            yield self.batch(step)
            step += 1
