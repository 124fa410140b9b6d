"""Conversations as text, in one layout for training on them (``fax prepare --messages-field``) and
for answering them (``POST /v1/chat/completions``), so that a model is asked the way it was taught.

The layout is the tokenizer's: its chat template when it ships one (a Hugging Face
``tokenizer_config.json`` or ``chat_template.jinja`` beside its ``tokenizer.json``), else fax's own,
where each message is its role's header, its content and the end-of-turn marker. Only what an
assistant says (its content and the marker that ends it) is trained on; the rest is read as context.
A reply is generated after the assistant's header and ends at the marker.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"

Piece = tuple[str, bool]  # text, and whether the model is trained to write it
Messages = list[dict[str, str]]


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


class Layout:
    """fax's own layout: role headers and ``END_OF_TURN`` as plain text, which any tokenizer reads."""

    end_ids: tuple[int, ...] = ()  # tokens that end a reply, besides the tokenizer's end of text

    def pieces(self, messages: Messages, reply: bool = False) -> list[Piece]:
        """The conversation's text, piece by piece (each piece is tokenized alone, in training and
        serving alike); with ``reply``, ending where the assistant's next message begins."""
        out: list[Piece] = []
        for m in messages:
            said = m["role"] == "assistant"
            out += [(header(m["role"]), False), (m["content"], said), (END_OF_TURN, said), ("\n", False)]
        if reply:
            out.append((header("assistant"), False))
        return out

    def prompt_ids(self, encode: Callable[[str], Iterable[int]], messages: Messages) -> list[int]:
        """The tokens (of a tokenizer's ``encode``) a reply to ``messages`` is generated after."""
        return [int(t) for text, _ in self.pieces(messages, reply=True) for t in encode(text)]

    def reply_stops(self, stop: Sequence[str]) -> tuple[str, ...]:
        """The stop sequences of a reply: the caller's, and the end of the assistant's turn."""
        return (*stop, END_OF_TURN)


class TemplateError(ValueError):
    """A chat template that fails, or that fax cannot split into what is and is not trained on."""


class Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text for Hugging Face's
    masks; fax finds that text itself, so the block renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _template_environment() -> Any:
    """Jinja as Hugging Face renders chat templates (blocks trimmed, loop controls, ``tojson``,
    ``raise_exception``, ``{% generation %}``), sandboxed: a template is a downloaded file and may
    touch nothing but the data it is given."""
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class TemplateLayout(Layout):
    """A tokenizer's own chat template. The pieces come from rendering the conversation one message
    longer at a time: each message adds text after the last, and an assistant's message is the
    text past the assistant's header (``add_generation_prompt``) up to its end-of-turn marker. The
    marker is what the template writes after an assistant's content; when it is one token (most
    are: ``<|eot_id|>``, ``<|im_end|>``, ``</s>``), that token ends a reply, since decoding drops
    special tokens from the text."""

    PROBE = "\x00fax\x00"  # an assistant's content, to find the end-of-turn marker after it

    def __init__(self, source: str, special_tokens: dict[str, str], token_id: Callable[[str], int | None]):
        try:
            self.template = _template_environment().from_string(source)
        except TemplateSyntaxError as e:
            raise TemplateError(f"the tokenizer's chat template does not parse: {e}") from e
        self.special_tokens = special_tokens
        try:
            probe = self.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": self.PROBE}])
            self.end_of_turn = probe[probe.index(self.PROBE) + len(self.PROBE):].strip()
        except ValueError:  # a template with demands of its own (or no content): replies end at end of text
            self.end_of_turn = ""
        end_id = token_id(self.end_of_turn) if self.end_of_turn else None
        self.end_ids = () if end_id is None else (end_id,)

    def render(self, messages: Messages, reply: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=reply, **self.special_tokens)
        except TemplateError as e:
            raise TemplateError(f"the tokenizer's chat template refuses the conversation: {e}") from e
        except JinjaError as e:
            raise TemplateError(f"the tokenizer's chat template fails: {e}") from e

    def pieces(self, messages: Messages, reply: bool = False) -> list[Piece]:
        out: list[Piece] = []
        done = ""  # the text of the messages so far
        for i, m in enumerate(messages):
            text = self.render(messages[:i + 1])
            if m["role"] == "assistant":
                start = self._extend(done, self.render(messages[:i], reply=True), i)
                said = self._extend(start, text, i)[len(start):]
                end = said.rfind(self.end_of_turn) + len(self.end_of_turn) if self.end_of_turn in said else len(said)
                out += [(start[len(done):], False), (said[:end], True), (said[end:], False)]
            else:
                out.append((self._extend(done, text, i)[len(done):], False))
            done = text
        if reply:
            out.append((self._extend(done, self.render(messages, reply=True), len(messages))[len(done):], False))
        return [(text, trained) for text, trained in out if text]

    def reply_stops(self, stop: Sequence[str]) -> tuple[str, ...]:
        return (*stop, self.end_of_turn) if self.end_of_turn and not self.end_ids else tuple(stop)

    @staticmethod
    def _extend(before: str, after: str, i: int) -> str:
        """``after``, checked to continue ``before``: a template that rewrites earlier text when a
        message is added (as some do to drop earlier reasoning) cannot be split into pieces."""
        if not after.startswith(before):
            raise TemplateError(f"the tokenizer's chat template changes the text before message {i} when it is "
                                "added, so fax cannot tell which tokens are the assistant's; use a template that "
                                "lays the messages out one after another")
        return after


FAX_LAYOUT = Layout()


def layout(tokenizer: Any) -> Layout:
    """The layout of conversations for ``tokenizer``: its chat template if it has one, else fax's."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return FAX_LAYOUT
    return TemplateLayout(source, tokenizer.special_tokens, tokenizer.token_id)
