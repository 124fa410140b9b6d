"""Reading input files (text, JSONL, Parquet) into documents, and writing files atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fax.data import chat


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


# What to do with a text or JSONL file that is not UTF-8: refuse it by name, replace each undecodable
# byte sequence with U+FFFD (counted in the dataset's index), or skip the file (counted too).
INVALID_UTF8 = ("refuse", "replace", "skip")


def read_text(path: Path, invalid_utf8: str = "refuse") -> str:
    """``path``'s text; "" for a file skipped as not UTF-8 (``invalid_utf8``: see INVALID_UTF8)."""
    data = path.read_bytes()
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        if invalid_utf8 == "refuse":
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it, "
                             "leave it out (--suffix), or pass --invalid-utf8 replace (or skip)") from None
        return data.decode(errors="replace") if invalid_utf8 == "replace" else ""


def replaced_sequences(path: Path) -> int:
    """How many undecodable byte sequences ``read_text(path, "replace")`` replaced (0 for Parquet, whose
    strings its reader decodes)."""
    if path.suffix == ".parquet":
        return 0
    data = path.read_bytes()
    return data.decode(errors="replace").count("\ufffd") - data.decode(errors="ignore").count("\ufffd")


def _json_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: the record nests JSON too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object of fields, got {type(record).__name__}")
    return record


def read_records(path: Path, options: dict[str, str], invalid_utf8: str = "refuse") -> list[tuple[str, dict[str, Any]]]:
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
    lines = read_text(path, invalid_utf8).splitlines()
    rows = [(f"{path}:{n}", _json_record(line, f"{path}:{n}")) for n, line in enumerate(lines, 1) if line.strip()]
    for where, row in rows:
        missing = [f for f in options if f not in row]
        if missing:
            raise ValueError(f"{where}: no field {missing[0]!r}; set {options[missing[0]]}")
    return rows


def read_documents(path: Path, text_field: str = "text", prompt_field: str = "", messages_field: str = "",
                   layout: chat.Layout = chat.FAX_LAYOUT, invalid_utf8: str = "refuse") -> list[list[chat.Piece]]:
    """The documents of one file, each as pieces of text and whether it is trained on: a line of
    JSONL or a row of Parquet (its ``text_field``, after its ``prompt_field`` if one is named, read
    but not trained on; or its ``messages_field``, a conversation in the tokenizer's ``layout``), or a
    whole text file; one that is not UTF-8 as ``invalid_utf8`` says. A document without text, or a
    conversation without an assistant message, is dropped."""
    fields = [messages_field] if messages_field else [f for f in (prompt_field, text_field) if f]
    options = {field: {messages_field: "--messages-field", prompt_field: "--prompt-field"}.get(field, "--text-field")
               for field in fields}
    if path.suffix in (".parquet", ".jsonl"):
        rows = read_records(path, options, invalid_utf8)
    else:
        text = read_text(path, invalid_utf8)
        return [[(text, True)]] if text else []
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




def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)

