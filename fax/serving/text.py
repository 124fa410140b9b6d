"""From tokens to text: a run's tokenizer, the tokens that end a generation, streamed text deltas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fax.config import Config
from fax.data import HFTokenizer, TokenDataset, Tokenizer, dataset_path, get_tokenizer
from fax.data import chat

def generation_ends(tokenizer: Any, conversation: chat.Layout | None = None) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's end of text, and the end of an assistant's
    turn where its chat template writes a token for it (Llama 3's ``<|eot_id|>``). ``conversation``:
    the tokenizer's ``chat.layout``, when the caller has built it."""
    return (tokenizer.eos_id, *(conversation or chat.layout(tokenizer)).end_ids)


def run_tokenizer(config: Config) -> Tokenizer:
    """The tokenizer the run was trained with: its own copy, else the one of its dataset."""
    if (Path(config.run_dir) / HFTokenizer.name).exists():
        return get_tokenizer(HFTokenizer.name, config.run_dir)
    path = dataset_path(config.data.path)
    return TokenDataset.open(path).tokenizer(path)


class TextStream:
    """Turns tokens into text deltas, holding back bytes of a character not yet complete, and
    ending at the first stop sequence (which is not part of the output)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            text = text[:min(hits)]
        elif text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        else:  # hold back a tail that could still grow into a stop sequence
            hold = max((k for s in self.stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        delta = text[len(self.sent):]
        self.sent += delta
        return delta

    def flush(self) -> str:
        """What was held back, once the generation has ended without a stop."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        delta, self.sent = text[len(self.sent):], text
        return delta


