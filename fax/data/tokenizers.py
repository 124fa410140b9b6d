"""Tokenizers: UTF-8 bytes, or a Hugging Face ``tokenizer.json`` (trained here or shipped with a checkpoint)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers
import tokenizers.trainers

from fax.data.files import write_atomic


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
    template and named special tokens (``fax.data.chat`` lays conversations out with them)."""

    name = "tokenizer.json"  # the file a dataset folder and a run directory keep it in
    COMPANIONS = ("tokenizer_config.json", "chat_template.jinja")  # kept beside it wherever it is copied
    EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tok = tokenizers.Tokenizer.from_file(str(path))
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
    return fingerprint(*[(folder / n).read_text() for n in files if (folder / n).exists()])


def get_tokenizer(name: str, folder: str | Path | None = None) -> Tokenizer:
    """``byte``, or the ``tokenizer.json`` kept in ``folder`` (a dataset folder or a run directory)."""
    if name == "byte":
        return ByteTokenizer()
    if name == HFTokenizer.name and folder is not None:
        return HFTokenizer(Path(folder) / name)
    raise ValueError(f"unknown tokenizer {name!r}; use byte, bpe (trained by fax prepare) or a tokenizer.json path")


def train_bpe(documents: Iterable[str], vocab_size: int, path: str | Path) -> HFTokenizer:
    """A byte-level BPE tokenizer trained on ``documents`` (lossless on any text), saved to ``path``."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    tok.save(str(path))
    return HFTokenizer(path)



def fingerprint(*parts: object) -> str:
    """A short hash of JSON-able ``parts``: what names a shard, a dataset's inputs, a tokenizer."""
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]
