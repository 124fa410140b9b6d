"""``fax presets``: the named model shapes and their sizes."""

from __future__ import annotations

import argparse

HELP = "list the named model shapes"


def add(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("presets", help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.models.config import matmul_param_count, param_count
    from fax.models.presets import preset, preset_about, preset_names

    print(f"{'preset':<15}{'params':>12}{'active':>12}{'layers':>8}{'d_model':>9}{'heads':>7}{'kv':>5}{'context':>9}"
          f"{'experts':>9}  about")
    for name in preset_names():
        m = preset(name)
        experts = f"{m.moe_top_k}/{m.moe_experts}" if m.moe_experts else "-"
        # active: the parameters a token's matmuls use (a mixture of experts': its routed experts')
        print(f"{name:<15}{param_count(m) / 1e6:>11,.1f}M{matmul_param_count(m) / 1e6:>11,.1f}M{m.n_layers:>8}"
              f"{m.d_model:>9}{m.n_heads:>7}{m.n_kv_heads:>5}{m.max_seq_len:>9}{experts:>9}  {preset_about(name)}")
    return 0
