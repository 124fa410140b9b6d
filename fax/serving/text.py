"""From tokens to text: a run's tokenizer, the tokens that end a generation, streamed text deltas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fax.config import Config
from fax.data import HFTokenizer, TokenDataset, Tokenizer, dataset_path, get_tokenizer
from fax.data import chat
from fax.interop.sources import hf_folder

def generation_ends(tokenizer: Any, conversation: chat.Layout | None = None) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's end of text, and the end of an assistant's
    turn where its chat template writes a token for it (Llama 3's ``<|eot_id|>``). ``conversation``:
    the tokenizer's ``chat.layout``, when the caller has built it."""
    return (tokenizer.eos_id, *(conversation or chat.layout(tokenizer)).end_ids)


def run_tokenizer(config: Config) -> Tokenizer:
    """The tokenizer the run was trained with: its own copy (a Hugging Face folder's own), else the one
    of its dataset."""
    folder = hf_folder(config.run_dir) or Path(config.run_dir)
    if (folder / HFTokenizer.name).exists():
        return get_tokenizer(HFTokenizer.name, folder)
    path = dataset_path(config.data.path)
    return TokenDataset.open(path).tokenizer(path)


MAX_CHARACTER_TOKENS = 4  # a UTF-8 character has at most 4 bytes: past that, a replacement character is text


class StopMatcher:
    """Where a stop sequence ends in text fed one character at a time (Knuth-Morris-Pratt): constant
    work per character however long the sequence, where searching the text for it on every token
    costs the square of its length."""

    def __init__(self, stop: str):
        self.stop, self.matched = stop, 0  # matched: the longest prefix of ``stop`` the text ends with
        self.fallback = [0] * len(stop)  # for each prefix, its longest proper prefix that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            k += stop[i] == stop[k]
            self.fallback[i] = k

    def feed(self, char: str) -> bool:
        """True when ``char`` completes the stop sequence."""
        while self.matched and char != self.stop[self.matched]:
            self.matched = self.fallback[self.matched - 1]
        self.matched += char == self.stop[self.matched]
        return self.matched == len(self.stop)


class TextStream:
    """Turns tokens into text deltas, holding back bytes of a character not yet complete and text that
    could still grow into a stop sequence, and ending at the first stop sequence (not part of the
    output). Each token costs work for its own characters only: the tokenizer decodes a short window
    of recent tokens (the previous ones give the new ones their context, e.g. a leading space)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.ids: list[int] = []
        self.stopped = False
        self._context = 0  # the window's first token
        self._read = 0  # the tokens turned into text so far
        self._window_text = ""  # the text of ids[_context:_read]
        self._held = ""  # text that may be the start of a stop sequence

    def _new_text(self) -> str:
        return self.tokenizer.decode(self.ids[self._context:])[len(self._window_text):]

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.stopped:
            return ""
        new = self._new_text()
        if new.endswith("\ufffd") and len(self.ids) - self._read < MAX_CHARACTER_TOKENS:
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        self._context, self._read = self._read, len(self.ids)
        self._window_text = self.tokenizer.decode(self.ids[self._context:self._read])
        text = self._held + new
        for i, char in enumerate(new, start=len(self._held)):
            ended = [m for m in self.matchers if m.feed(char)]  # every matcher sees every character
            if ended:
                self.stopped, self._held = True, ""
                return text[:i + 1 - max(len(m.stop) for m in ended)]
        hold = max((m.matched for m in self.matchers), default=0)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self) -> str:
        """What was held back, once the generation has ended without a stop."""
        if self.stopped:
            return ""
        delta, self._held = self._held + self._new_text(), ""
        self._context = self._read = len(self.ids)
        self._window_text = ""
        return delta
