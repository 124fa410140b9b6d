"""Options several commands share."""

from __future__ import annotations

import argparse
import os


def compile_on_this_cpu() -> None:
    """For a TPU slice that is not here: XLA's TPU compiler runs on the CPU, and no accelerator of this
    machine's is needed (nor probed for, which libtpu takes ~11 s over), unless JAX_PLATFORMS says."""
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


def add_ray_options(command: argparse.ArgumentParser) -> None:
    ray_mode = command.add_argument_group("Ray mode (one worker per host; see docs/many-hosts.md)")
    ray_mode.add_argument("--ray", action="store_true", help="run on a Ray cluster (cluster.ray=true)")
    ray_mode.add_argument("--address", help="the Ray cluster to join, e.g. auto (cluster.address); "
                                            "default: start a local one")
    ray_mode.add_argument("--emulate-hosts", type=int, metavar="N",
                          help="a local cluster of N emulated CPU hosts (cluster.emulate_hosts)")
    ray_mode.add_argument("--devices-per-host", type=int, metavar="K",
                          help="emulated CPU devices per host (cluster.devices_per_host, default 4)")


def cluster_settings(args: argparse.Namespace) -> list[str]:
    """The Ray-mode options as ``cluster.*`` settings (the ``key=value`` ones come after: they win)."""
    return [f"cluster.{key}={value}" for key, value in (
        ("ray", "true" if args.ray or args.emulate_hosts or args.address else None),
        ("address", args.address), ("emulate_hosts", args.emulate_hosts),
        ("devices_per_host", args.devices_per_host)) if value is not None]


def add_penalty_options(command: argparse.ArgumentParser) -> None:
    """OpenAI's repetition penalties, as the HTTP API takes them."""
    command.add_argument("--frequency-penalty", type=float, default=0.0,
                         help="lower a token's logit by this times its count in the text generated so far ([-2, 2])")
    command.add_argument("--presence-penalty", type=float, default=0.0,
                         help="lower a token's logit by this once it was generated ([-2, 2])")


def add_sampling_options(command: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """How a completion is sampled (as ``SamplingParams``)."""
    command.add_argument("--max-tokens", type=int, default=max_tokens)
    command.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    command.add_argument("--top-k", type=int, default=0, help="0: no limit")
    command.add_argument("--top-p", type=float, default=1.0)
    command.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    add_penalty_options(command)


def add_config_options(command: argparse.ArgumentParser) -> None:
    """A run's settings: ``key.sub=value`` overrides after an optional YAML file (``fax config`` lists them)."""
    command.add_argument("overrides", nargs="*", metavar="key=value")
    command.add_argument("--config", help="a YAML file of settings, applied before the overrides")
