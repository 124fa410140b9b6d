"""``fax metrics``: compare runs from their logs; ``--plot`` draws their curves."""

from __future__ import annotations

import argparse

HELP = "compare runs' logged metrics: loss, val_loss, tokens/s, MFU; --plot draws their curves"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help=HELP)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--plot", metavar="FILE", help="write loss, tokens/s, MFU and lr against the step, a line per "
                                                  "run (.png, .svg or .pdf; needs the plot extra)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.metrics import plot_runs, run_metrics, summary_table

    try:
        runs = {run_dir: run_metrics(run_dir) for run_dir in args.run_dirs}
        print(summary_table(runs))
        if args.plot:
            plot_runs(runs, args.plot)
            print(f"wrote {args.plot}")
    except (ImportError, ValueError) as e:  # no matplotlib; a log that is not one
        raise ConfigError(str(e)) from None
    return 0
