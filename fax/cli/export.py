"""``fax export``: a run's checkpoint as a Hugging Face directory (or its LoRA adapters alone)."""

from __future__ import annotations

import argparse

HELP = "write a run's checkpoint as a Hugging Face directory (GPT-2, Llama, Qwen2 or Qwen3 layout)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.add_argument("--step", type=int, help="default: the latest complete checkpoint")
    p.add_argument("--adapters-only", action="store_true", help="a LoRA run's adapters alone (safetensors)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the tensors' dtype")
    p.add_argument("--max-shard-gib", type=float, default=5.0,
                   help="the largest safetensors file; more are written with model.safetensors.index.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.interop.hf import export_adapters, export_run

    try:
        if args.adapters_only:
            out, step = export_adapters(args.run_dir, args.out, args.step)
        else:
            out, step = export_run(args.run_dir, args.out, args.step, args.dtype, int(args.max_shard_gib * 2 ** 30))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    what = "LoRA adapters" if args.adapters_only else "Hugging Face model (adapters merged)"
    print(f"fax: wrote the checkpoint of step {step} of {args.run_dir} as a {what} to {out}")
    return 0
