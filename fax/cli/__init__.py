"""The ``fax`` command line: one module per command, each mapping its flags to one call into the
layers below. ``fax --help`` and ``fax <command> --help`` import no jax: a command imports what it
runs only when it runs."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from fax.cli import (checkpoint, compile, config, eval, export, generate, infer, metrics, plan, prepare, presets,
                     serve, train)

COMMANDS = (train, eval, prepare, generate, serve, infer, plan, compile, export, checkpoint, metrics, presets, config)
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a command ended by Ctrl-C


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fax", description="Train and serve language models with JAX.")
    p.add_argument("--cpu-devices", type=int,
                   help="devices to emulate on the CPU when there is no accelerator (default: 8, and 1 for "
                        "generate and serve)")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``key=value`` settings may come after options too (``fax train --ray
    train.steps=5``), where argparse alone takes only those before the first option."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (how job schedulers and service managers stop a process) unwinds like Ctrl-C, so
    every command's cleanup runs: Ray and its workers shut down, a server stops. Python's default
    ends the process on the spot and leaves Ray's processes behind. (Training takes both signals
    over while it runs, to save a checkpoint first.) A repeated SIGTERM is ignored from then on: it
    would cut that cleanup short (``timeout`` and a signal to the process group each send one);
    Ctrl-C still does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def cpu_devices(command: str, asked: int | None) -> int:
    """How many devices to emulate on the CPU: 8 by default, a mesh to train and evaluate over; 1 to
    generate and serve. Emulated devices share the same cores, so an engine split over them does the
    same work plus collectives, and runs slower than in a process of one device."""
    if asked is not None:
        return asked
    return 1 if command in ("generate", "serve") else 8


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    from fax.signals import handling

    try:
        with handling(_interrupt, signal.SIGTERM):  # from before jax loads: a SIGTERM at any moment ends cleanly
            return _run(args)
    except KeyboardInterrupt:
        print("fax: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def _run(args: argparse.Namespace) -> int:
    explicit, args.cpu_devices = args.cpu_devices is not None, cpu_devices(args.command, args.cpu_devices)
    if not getattr(args, "without_jax", lambda _: False)(args):
        import jax

        try:  # only the CPU backend reads this: with no accelerator, the CPU is split into emulated devices
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        except RuntimeError:  # JAX had started in this process already (main called from Python): its devices stand
            if explicit:
                raise
    from fax.config import ConfigError
    from fax.data.chat import TemplateError

    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, TemplateError) as e:
        print(f"fax: error: {e}", file=sys.stderr)
        return 2

