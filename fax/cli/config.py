"""``fax config``: every setting of ``fax train`` with its default and what it does."""

from __future__ import annotations

import argparse

HELP = "list every setting (key.sub=value) with its default and a one-line description"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help=HELP)
    p.add_argument("section", nargs="?", help="only this section, e.g. train or model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError, settings

    rows = [s for s in settings() if not args.section or s.key.split(".")[0] == args.section]
    if not rows:
        raise ConfigError(f"no section {args.section!r}; sections: "
                          f"{', '.join(sorted({s.key.split('.')[0] for s in settings() if '.' in s.key}))}")
    width = max(len(s.key) for s in rows) + 2
    default_width = min(max(len(s.default) for s in rows), 24) + 2
    for s in rows:
        print(f"{s.key:<{width}}{s.default:<{default_width}}{s.description}")
    return 0
