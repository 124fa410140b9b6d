"""``fax train``: train (or resume) a run; a sample of the trained model at the end."""

from __future__ import annotations

import argparse
import sys

from fax.cli.options import add_config_options, add_ray_options, cluster_settings

HELP = "train a model (defaults: a small GPT on the Python standard library)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP,
                       description="Train. Settings are key.sub=value overrides, e.g. `fax train model=llama-tiny "
                                   "train.steps=30 run_dir=runs/a`; `fax config` lists them all.")
    add_config_options(p)
    add_ray_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import load_config
    from fax.train.loop import PREEMPTED_EXIT_CODE, Preempted, Trainer

    config = load_config(args.config, [*cluster_settings(args), *args.overrides])
    try:
        with Trainer(config) as trainer:
            trainer.fit()
            t = trainer.config.train
            if t.sample_tokens and trainer.history and trainer.history[-1]["step"] == t.steps:
                print("fax: sample ->\n" + sample(trainer, t.sample_prompt, t.sample_tokens), flush=True)
    except Preempted as e:
        print(f"fax: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def sample(trainer, prompt: str, tokens: int) -> str:
    """``prompt`` continued by the trained model, from the checkpoint the run ended with, by the
    serving engine: on this process's devices, or in Ray mode on the run's host workers."""
    from fax.serving.batching import complete
    from fax.serving.engine import Engine
    from fax.serving.text import run_tokenizer

    config = trainer.config
    if config.cluster.ray:
        from fax.serving.cluster_engine import ClusterEngine

        engine = ClusterEngine(trainer.runtime.group, config.run_dir, None, max_batch=1)
    else:
        engine = Engine.from_run_dir(config.run_dir, devices=trainer.devices, max_batch=1)
    return complete(engine, run_tokenizer(config), prompt, tokens, seed=config.seed)
