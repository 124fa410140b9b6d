"""``fax export``: a run's checkpoint as a Hugging Face directory (or its LoRA adapters alone)."""

from __future__ import annotations

import argparse

HELP = "write a run's checkpoint as a Hugging Face GPT-2/Llama directory"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.add_argument("--step", type=int, help="default: the latest complete checkpoint")
    p.add_argument("--adapters-only", action="store_true", help="a LoRA run's adapters alone (safetensors)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.interop.hf import export_adapters, export_run

    try:
        out, step = (export_adapters if args.adapters_only else export_run)(args.run_dir, args.out, args.step)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    what = "LoRA adapters" if args.adapters_only else "Hugging Face model (adapters merged)"
    print(f"fax: wrote the checkpoint of step {step} of {args.run_dir} as a {what} to {out}")
    return 0
