"""``fax config``: every setting of ``fax train`` with its default and what it does."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import yaml

from fax.config import Config, ConfigError

HELP = "list every setting (key.sub=value) with its default and a one-line description"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help=HELP)
    p.add_argument("section", nargs="?", help="only this section, e.g. train or model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    rows = [s for s in settings() if not args.section or s.key.split(".")[0] == args.section]
    if not rows:
        raise ConfigError(f"no section {args.section!r}; sections: "
                          f"{', '.join(sorted({s.key.split('.')[0] for s in settings() if '.' in s.key}))}")
    width = max(len(s.key) for s in rows) + 2
    default_width = min(max(len(s.default) for s in rows), 24) + 2
    for s in rows:
        print(f"{s.key:<{width}}{s.default:<{default_width}}{s.description}")
    return 0


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, as overrides take it
    default: str  # as YAML would read it back
    description: str


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` and the comment that says what it is: the comment on its line,
    else the comment lines just above it (the source is the one place the descriptions live)."""
    lines, found, above = inspect.getsource(cls).splitlines(), {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        name, colon, rest = text.partition(":")
        if colon and name.isidentifier() and "=" in rest:
            comment = rest.partition("  # ")[2]
            found[name] = comment or " ".join(above)
        above = []
    return found


def settings(obj: Any = None, prefix: str = "") -> list[Setting]:
    """Every setting under ``obj`` (default: a fresh ``Config``) with its default and description."""
    obj = Config() if obj is None else obj
    described = field_descriptions(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(settings(value, f"{prefix}{f.name}."))
        else:
            default = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                                     default_flow_style=True).strip().removesuffix("...").strip()
            out.append(Setting(prefix + f.name, default, described.get(f.name, "")))
    return out
