"""``fax eval``: a checkpoint's loss and perplexity on a dataset split."""

from __future__ import annotations

import argparse
import math

from fax.cli.options import add_ray_options, cluster_settings

HELP = "a checkpoint's loss and perplexity on a dataset split (by default the run's own val_loss)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=HELP)
    p.add_argument("run_dir", help="a run directory, or hf:DIR (a Hugging Face folder: give data.path)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings to change: data.path, train.eval_batches, train.batch_size, train.seq_len, "
                        "parallel.* (the mesh: any that fits the devices), cluster.* (Ray mode)")
    p.add_argument("--step", type=int, help="the checkpoint (default: the latest complete one)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    add_ray_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.train.evaluate import evaluate_checkpoint

    step, loss = evaluate_checkpoint(args.run_dir, [*cluster_settings(args), *args.overrides], args.step, args.split,
                                     echo=print)
    print(f"step {step}: {args.split} loss {loss:.4f}, perplexity {math.exp(loss):,.2f}")
    return 0
