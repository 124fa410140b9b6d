"""The ``fax`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from fax.config import load_config
    from fax.trainer import Trainer

    config = load_config(args.config, args.overrides)
    Trainer(config).fit()
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from fax.data import prepare, text_files

    suffixes = tuple(args.suffix) if args.suffix else None
    index = prepare(text_files(args.inputs, suffixes), args.out, args.tokenizer)
    print(f"wrote {index['num_tokens']:,} tokens from {index['num_documents']:,} documents to {args.out}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    import models

    print(f"{'preset':<14}{'params':>12}{'layers':>8}{'d_model':>9}{'heads':>7}{'kv':>5}{'context':>9}")
    for name in models.preset_names():
        m = models.preset(name)
        print(f"{name:<14}{models.param_count(m) / 1e6:>11,.1f}M{m.n_layers:>8}{m.d_model:>9}{m.n_heads:>7}"
              f"{m.n_kv_heads:>5}{m.max_seq_len:>9}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fax", description="Train and serve language models with JAX.")
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="devices to emulate on the CPU when there is no accelerator (default 8)")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (defaults: a small GPT on the Python standard library)",
                           description="Train. Settings are key.sub=value overrides, e.g. "
                                       "`fax train model=llama-tiny train.steps=30 run_dir=runs/a`.")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.add_argument("--config", help="a YAML file of settings, applied before the overrides")
    train.set_defaults(run=_train)

    prep = sub.add_parser("prepare", help="tokenize text files into the dataset format `data.path` reads")
    prep.add_argument("inputs", nargs="+", help="files or folders (walked recursively)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--tokenizer", default="byte")
    prep.add_argument("--suffix", action="append", help="only files with this suffix (repeatable), e.g. .txt")
    prep.set_defaults(run=_prepare)

    presets = sub.add_parser("presets", help="list the named model shapes")
    presets.set_defaults(run=_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import jax

    # Only the CPU backend reads this: with no accelerator, the CPU is split into emulated devices.
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from fax.config import ConfigError

    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
