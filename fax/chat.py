"""Conversations as text, in one format for training on them (``fax prepare --messages-field``) and
for answering them (``POST /v1/chat/completions``), so that a model is asked the way it was taught.

Each message is its role's header, its content and the end-of-turn marker. Only what an assistant
says (its content and the marker that ends it) is trained on; the rest is read as context. A reply
is generated after the assistant's header and ends at the marker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"

Piece = tuple[str, bool]  # text, and whether the model is trained to write it


def header(role: str) -> str:
    return f"<|{role}|>\n"


def message_problems(messages: Any) -> list[str]:
    """What makes ``messages`` not a conversation: a non-empty list of {"role", "content"} objects,
    roles among ``ROLES``, contents text."""
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list of {\"role\", \"content\"} objects"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"messages[{i}] must be an object with role and content")
        elif m.get("role") not in ROLES:
            problems.append(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        elif not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}].content must be text")
    return problems


def pieces(messages: list[dict[str, str]], reply: bool = False) -> list[Piece]:
    """The conversation's text, piece by piece (each piece is tokenized alone, in training and
    serving alike); with ``reply``, ending where the assistant's next message begins."""
    out: list[Piece] = []
    for m in messages:
        said = m["role"] == "assistant"
        out += [(header(m["role"]), False), (m["content"], said), (END_OF_TURN, said), ("\n", False)]
    if reply:
        out.append((header("assistant"), False))
    return out


def prompt_ids(encode: Callable[[str], Iterable[int]], messages: list[dict[str, str]]) -> list[int]:
    """The tokens (of a tokenizer's ``encode``) a reply to ``messages`` is generated after."""
    return [int(t) for text, _ in pieces(messages, reply=True) for t in encode(text)]


def reply_stops(stop: Sequence[str]) -> tuple[str, ...]:
    """The stop sequences of a reply: the caller's, and the end of the assistant's turn."""
    return (*stop, END_OF_TURN)
