"""``fax presets``: the named model shapes and their sizes."""

from __future__ import annotations

import argparse

HELP = "list the named model shapes"


def add(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("presets", help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.models.config import param_count
    from fax.models.presets import preset, preset_names

    print(f"{'preset':<14}{'params':>12}{'layers':>8}{'d_model':>9}{'heads':>7}{'kv':>5}{'context':>9}")
    for name in preset_names():
        m = preset(name)
        print(f"{name:<14}{param_count(m) / 1e6:>11,.1f}M{m.n_layers:>8}{m.d_model:>9}{m.n_heads:>7}"
              f"{m.n_kv_heads:>5}{m.max_seq_len:>9}")
    return 0
