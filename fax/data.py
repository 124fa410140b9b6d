"""Tokenizer, the on-disk token format, the embedded corpus, and the deterministic sampler.

Format of a prepared dataset folder: ``tokens.bin`` (flat uint16/uint32 tokens, each document
followed by the tokenizer's end-of-document id), ``val.bin`` (the validation split, same format),
``index.json`` (tokenizer, dtype, counts), ``tokenizer.json`` for a non-byte tokenizer, and
``shards/`` (one file's tokens each, what makes a re-run incremental). index.json is written last,
by rename, so a folder without it is never taken for a complete dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fax import chat

FORMAT = "fax-tokens-v1"
# Set on the tokens a document holds as context: a prompt, or a conversation's messages other than the
# assistant's (datasets prepared with a prompt or messages field, always uint32). The model reads them
# but is not trained to predict them. Read as int32 they are negative.
PROMPT_FLAG = 1 << 31
# Set by a Sampler told the end-of-document id on the tokens that end a document: the step then
# masks attention at them (``data.document_mask``). Never stored.
DOCUMENT_END = 1 << 30
TOKEN_ID = DOCUMENT_END - 1  # the id bits of a batch's token, below the flags


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; 256 ends a document."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` of the ``tokenizers`` library: one trained here (``bpe``) or one shipped
    with a Hugging Face checkpoint. Its end-of-document id is its end-of-text special token. A
    Hugging Face ``tokenizer_config.json`` or ``chat_template.jinja`` beside it brings its chat
    template and named special tokens (``fax.chat`` lays conversations out with them)."""

    name = "tokenizer.json"  # the file a dataset folder and a run directory keep it in
    COMPANIONS = ("tokenizer_config.json", "chat_template.jinja")  # kept beside it wherever it is copied
    EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = [self.tok.token_to_id(t) for t in self.EOS_TOKENS]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"{path}: no end-of-text token ({', '.join(self.EOS_TOKENS)}) to separate documents")
        self.eos_id = found[0]
        config_file, template_file = (self.path.with_name(n) for n in self.COMPANIONS)
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template_file.read_text() if template_file.exists() else template
        self.special_tokens = {k: v.get("content", "") if isinstance(v, dict) else v for k, v in config.items()
                               if k.endswith("_token") and isinstance(v, (str, dict))}
        self._special_ids = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

    def token_id(self, text: str) -> int | None:
        """The id of the added (special) token that is exactly ``text``, if there is one."""
        return self._special_ids.get(text)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.uint32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id])


Tokenizer = ByteTokenizer | HFTokenizer


def copy_tokenizer(source: Path, folder: Path) -> None:
    """A ``tokenizer.json`` and the companions beside it (a chat template) copied into ``folder``
    (a dataset folder, a run directory); a companion the source lacks is removed there."""
    if source.absolute() != (folder / HFTokenizer.name).absolute():
        write_atomic(folder / HFTokenizer.name, source.read_bytes())
    for name in HFTokenizer.COMPANIONS:
        if (source.parent / name).absolute() == (folder / name).absolute():
            continue
        if (source.parent / name).exists():
            write_atomic(folder / name, (source.parent / name).read_bytes())
        else:
            (folder / name).unlink(missing_ok=True)


def tokenizer_fingerprint(folder: Path) -> str:
    """What a ``tokenizer.json`` and its companions in ``folder`` say, as a short hash."""
    files = [HFTokenizer.name, *HFTokenizer.COMPANIONS]
    return _fingerprint(*[(folder / n).read_text() for n in files if (folder / n).exists()])


def get_tokenizer(name: str, folder: str | Path | None = None) -> Tokenizer:
    """``byte``, or the ``tokenizer.json`` kept in ``folder`` (a dataset folder or a run directory)."""
    if name == "byte":
        return ByteTokenizer()
    if name == HFTokenizer.name and folder is not None:
        return HFTokenizer(Path(folder) / name)
    raise ValueError(f"unknown tokenizer {name!r}; use byte, bpe (trained by fax prepare) or a tokenizer.json path")


def train_bpe(documents: Iterable[str], vocab_size: int, path: str | Path) -> HFTokenizer:
    """A byte-level BPE tokenizer trained on ``documents`` (lossless on any text), saved to ``path``."""
    from tokenizers import Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    tok.save(str(path))
    return HFTokenizer(path)


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


def _json_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object of fields, got {type(record).__name__}")
    return record


def read_records(path: Path, options: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """Each JSONL record / Parquet row of ``path``, with where it is (``file:line``, ``file: row N``).
    Every record must hold the fields ``options`` names; a missing one is refused with the option
    that sets it."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for field, option in options.items():
            if field not in table.column_names:
                raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); "
                                 f"set {option}")
        return [(f"{path}: row {n}", row) for n, row in enumerate(table.select(list(options)).to_pylist(), 1)]
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [(f"{path}:{n}", _json_record(line, f"{path}:{n}")) for n, line in enumerate(lines, 1) if line.strip()]
    for where, row in rows:
        missing = [f for f in options if f not in row]
        if missing:
            raise ValueError(f"{where}: no field {missing[0]!r}; set {options[missing[0]]}")
    return rows


def read_documents(path: Path, text_field: str = "text", prompt_field: str = "", messages_field: str = "",
                   layout: chat.Layout = chat.FAX_LAYOUT) -> list[list[chat.Piece]]:
    """The documents of one file, each as pieces of text and whether it is trained on: a line of
    JSONL or a row of Parquet (its ``text_field``, after its ``prompt_field`` if one is named, read
    but not trained on; or its ``messages_field``, a conversation in the tokenizer's ``layout``), or a
    whole text file. A file that is not UTF-8 text holds none; a document without text, or a
    conversation without an assistant message, is dropped."""
    fields = [messages_field] if messages_field else [f for f in (prompt_field, text_field) if f]
    options = {field: {messages_field: "--messages-field", prompt_field: "--prompt-field"}.get(field, "--text-field")
               for field in fields}
    try:
        if path.suffix in (".parquet", ".jsonl"):
            rows = read_records(path, options)
        else:
            text = path.read_text(encoding="utf-8")
            return [[(text, True)]] if text else []
    except UnicodeDecodeError:
        return []
    if messages_field:
        docs = []
        for where, row in rows:
            messages = row[messages_field]
            problems = chat.message_problems(messages)
            if problems:
                raise ValueError(f"{where}: {problems[0]} (field {messages_field!r})")
            if any(m["role"] == "assistant" for m in messages):
                try:
                    docs.append(layout.pieces(messages))
                except chat.TemplateError as e:
                    raise ValueError(f"{where}: {e} (field {messages_field!r})") from None
        return docs
    docs = [(row[prompt_field] or "" if prompt_field else "", row[text_field]) for _, row in rows]
    for prompt, text in docs:
        if not isinstance(prompt, str) or not isinstance(text, (str, type(None))):
            raise ValueError(f"{path}: fields {', '.join(map(repr, fields))} must hold text, got "
                             f"{type(prompt).__name__} and {type(text).__name__}")
    return [[(prompt, False), (text, True)] if prompt_field else [(text, True)] for prompt, text in docs if text]


def tokenize_file(path: Path, tok: Tokenizer, layout: chat.Layout, dtype: np.dtype, text_field: str,
                  prompt_field: str = "", messages_field: str = "") -> tuple[np.ndarray, int]:
    """All documents of ``path`` (conversations in ``layout``), each followed by the end-of-document id,
    the tokens of what is not trained on marked with ``PROMPT_FLAG``; and how many documents there were."""
    docs = read_documents(path, text_field, prompt_field, messages_field, layout)
    encoded = iter(tok.encode_batch([text for doc in docs for text, _ in doc]))
    eos = np.array([tok.eos_id], dtype)
    parts = []
    for doc in docs:
        for _, trained in doc:
            ids = next(encoded).astype(dtype)
            parts.append(ids if trained else ids | dtype.type(PROMPT_FLAG))
        parts.append(eos)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), len(docs)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _file_key(path: Path, tokenizer_id: str, text_field: str, prompt_field: str, messages_field: str) -> str:
    stat = path.stat()
    # plain text: the keys as before prompts and conversations
    fields = [text_field, prompt_field, messages_field] if prompt_field or messages_field else text_field
    return _fingerprint(str(path.absolute()), stat.st_size, stat.st_mtime_ns, tokenizer_id, fields)


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _ShardWriter:
    """Tokenizes one file into its shard (``shards/KEY-DOCS.npy``); what Ray Data runs on its workers."""

    def __init__(self, out: str, tokenizer: str, dtype: str, text_field: str, prompt_field: str, messages_field: str):
        self.out, self.dtype = Path(out), np.dtype(dtype)
        self.fields = (text_field, prompt_field, messages_field)
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
            buffer = io.BytesIO()
            np.save(buffer, tokens)
            write_atomic(self.out / "shards" / f"{key}-{n}.npy", buffer.getvalue())
            docs.append(n)
            errors.append("")
        return {"key": list(batch["key"]), "documents": docs, "error": errors}


def _refuse_file(errors: Iterable[str]) -> None:
    """Raise the first problem a ``_ShardWriter`` reported, as the file's own ValueError."""
    problem = next((e for e in errors if e), None)
    if problem:
        raise ValueError(problem)


def _shard(out: Path, key: str) -> Path | None:
    return next(iter((out / "shards").glob(f"{key}-*.npy")), None)


def prepare(files: list[Path], out_dir: str | Path, tokenizer: str = "byte", *, vocab_size: int = 8192,
            val_fraction: float = 0.0, text_field: str = "text", prompt_field: str = "", messages_field: str = "",
            engine: str = "local", progress: bool = False) -> dict:
    """Tokenize ``files`` into ``out_dir``; returns the index.

    ``tokenizer``: ``byte``, ``bpe`` (trained here on the files, ``vocab_size`` tokens) or a path to a
    ``tokenizer.json``; either of the last two is kept in the folder. ``engine``: ``local`` (this
    process) or ``ray`` (Ray Data ``map_batches``, one file per task). Each file's tokens land in a
    shard named by the file's path, size, mtime and tokenizer, so a re-run tokenizes only what
    changed; a re-run with nothing changed returns at once. Documents go to the validation split
    (``val.bin``) with probability ``val_fraction``, decided by their position alone, so both
    engines write the same bytes. With ``prompt_field`` each JSONL/Parquet record is a prompt and
    its ``text_field``, and only the text is trained on (the prompt's tokens carry ``PROMPT_FLAG``);
    with ``messages_field`` each is a conversation (``fax.chat``), and only the assistant's messages
    are trained on. ``index.json`` is written last.
    """
    if prompt_field and messages_field:
        raise ValueError("a record is a prompt and a text (--prompt-field) or a conversation (--messages-field), "
                         "not both: set one")
    fields = (text_field, prompt_field, messages_field)
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if not files:
        raise ValueError("no input files")
    if tokenizer == "bpe":
        if not (out / HFTokenizer.name).exists():
            train_bpe((text for f in files for doc in read_documents(f, *fields) for text, _ in doc),
                      vocab_size, out / HFTokenizer.name)
        tokenizer = HFTokenizer.name
    elif tokenizer != "byte":
        source = Path(tokenizer)
        if not source.is_file():
            raise ValueError(f"tokenizer {tokenizer!r}: use byte, bpe, or the path of a tokenizer.json")
        copy_tokenizer(source, out)
        tokenizer = HFTokenizer.name
    tok = get_tokenizer(tokenizer, out)
    tokenizer_id = tokenizer if tokenizer == "byte" else tokenizer_fingerprint(out)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2 ** 16 and not (prompt_field or messages_field) else np.uint32)
    keys = [_file_key(f, tokenizer_id, *fields) for f in files]
    fingerprint = _fingerprint(keys, val_fraction)
    index_path = out / "index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("fingerprint") == fingerprint:
        return json.loads(index_path.read_text())
    index_path.unlink(missing_ok=True)  # the folder is incomplete until the new index lands
    todo = [(str(f), k) for f, k in zip(files, keys) if _shard(out, k) is None]
    writer_args = (str(out), tokenizer, dtype.name, *fields)
    bar = tqdm(total=len(files), initial=len(files) - len(todo), desc="tokenize", unit="file", disable=not progress)
    if engine == "ray" and todo:
        _tokenize_on_ray(todo, writer_args, bar)
    elif engine == "local":
        writer = _ShardWriter(*writer_args)
        for path, key in todo:
            _refuse_file(writer({"path": [path], "key": [key]})["error"])
            bar.update(1)
    elif engine != "ray":
        raise ValueError(f"engine {engine!r}: use local or ray")
    bar.close()
    return _assemble(out, files, keys, tok, dtype, tokenizer, val_fraction, fingerprint)


@contextlib.contextmanager
def ray_data_session() -> Iterator[Any]:
    """``ray.data`` on the running Ray cluster, or on a local one (files under /tmp) started for this
    block and shut down after it; Ray Data's own progress bars off (callers keep one bar)."""
    import ray

    from fax.cluster import start_ray

    owns = not ray.is_initialized()
    if owns:
        start_ray(_temp_dir=tempfile.mkdtemp(prefix="fax-ray-", dir="/tmp"), include_dashboard=False,
                  log_to_driver=False, configure_logging=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray.data
    finally:
        if owns:
            ray.shutdown()


def _tokenize_on_ray(todo: list[tuple[str, str]], writer_args: tuple, bar: Any) -> None:
    import ray

    with ray_data_session() as data:
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        files = data.from_items([{"path": p, "key": k} for p, k in todo],
                                override_num_blocks=min(len(todo), 4 * cpus))  # a few files per task
        # One tokenizer thread per worker: the pool, not each worker, spreads over the cores.
        written = files.map_batches(_ShardWriter, fn_constructor_args=writer_args, batch_size=None,
                                    compute=data.ActorPoolStrategy(min_size=1, max_size=cpus),
                                    runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        for row in written.iter_rows():
            _refuse_file([row["error"]])
            bar.update(1)


def _assemble(out: Path, files: list[Path], keys: list[str], tok: Tokenizer, dtype: np.dtype, tokenizer: str,
              val_fraction: float, fingerprint: str) -> dict:
    """Concatenate the shards in input order into tokens.bin and val.bin, then write the index."""
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    tmp = {split: out / f"{split}.bin.tmp-{os.getpid()}" for split in counts}
    with open(tmp["train"], "wb") as train, open(tmp["val"], "wb") as val:
        for k, key in enumerate(keys):
            tokens = np.load(_shard(out, key))
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
    os.replace(tmp["train"], out / "tokens.bin")
    os.replace(tmp["val"], out / "val.bin")
    index = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "dtype": dtype.name,
             "num_tokens": counts["train"][0], "num_documents": counts["train"][1],
             "val_tokens": counts["val"][0], "val_documents": counts["val"][1], "files": len(files),
             "fingerprint": fingerprint}
    write_atomic(out / "index.json", json.dumps(index, indent=2).encode())
    for stale in set((out / "shards").glob("*.npy")) - {_shard(out, k) for k in keys}:
        stale.unlink()  # shards of files no longer among the inputs (or changed since)
    return index


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def cache_dir() -> Path:
    """Where fax keeps what it derives once per machine (the default corpus, compiled CPU kernels):
    $FAX_CACHE, else ~/.cache/fax."""
    return Path(os.environ.get("FAX_CACHE", Path.home() / ".cache" / "fax"))


def default_corpus() -> Path:
    """The running interpreter's standard library sources, tokenized once into a cache folder, 2%
    of the files held out as the validation split."""
    out = cache_dir() / f"stdlib-{sysconfig.get_python_version()}-byte-val"
    if not (out / "index.json").exists():
        root = stdlib_dir()
        files = [f for f in text_files([root], (".py",))
                 if not ({"site-packages", "test", "tests", "idle_test"} & set(f.relative_to(root).parts))]
        prepare(files, out, val_fraction=0.02)
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


class Sampler:
    """Random windows of ``seq_len + 1`` tokens; the batch of step s depends only on (seed, s).

    That makes resume and failure recovery exact: restarting at step k yields the same batches
    k, k+1, ... as an uninterrupted run, and no host's clock or iteration history matters.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int,
                 document_end: int | None = None):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.document_end = document_end  # the end-of-document id, to flag with DOCUMENT_END
        self.n_starts = len(dataset.tokens) - seq_len  # valid window starts

    def batch(self, step: int) -> np.ndarray:
        """int32 tokens [batch_size, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.n_starts, size=self.batch_size)
        offsets = starts[:, None] + np.arange(self.seq_len + 1)
        tokens = np.asarray(self.dataset.tokens[offsets], dtype=np.int32)
        if self.document_end is not None:
            tokens[(tokens & TOKEN_ID) == self.document_end] |= DOCUMENT_END
        return tokens

    def batches(self, start: int = 0) -> Iterator[np.ndarray]:
        step = start
        while True:
            yield self.batch(step)
            step += 1
