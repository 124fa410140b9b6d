"""Evaluating a run's checkpoint: its loss on batches of a dataset split, locally or on every host."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from tqdm.auto import tqdm

from fax.checkpoint import Checkpointer, checkpoint_dir
from fax.config import ClusterConfig, apply_overrides, raise_problems, validate
from fax.data import dataset_path, open_split
from fax.interop.sources import absolute_source, hf_folder, source_config, tokenizer_problems
from fax.metrics import mesh_desc
from fax.train.loop import head_runtime
from fax.train.runtime import HostRuntime, Runtime


def evaluate_checkpoint(run_dir: str | Path, overrides: Sequence[str] = (), step: int | None = None,
                        split: str = "val", devices: list[jax.Device] | None = None,
                        echo: Callable[[str], None] = lambda _: None) -> tuple[int, float]:
    """The mean cross-entropy of a run's checkpoint (default: its latest; or a Hugging Face folder's
    weights, ``run_dir`` hf:DIR) on ``train.eval_batches``
    batches of a dataset split: with the run's settings, the batches and the loss its ``val_loss``
    logs. ``overrides`` change the data, the batches or the mesh (any that fits the devices); with
    ``cluster.ray=true`` (and the other ``cluster.*`` settings) every host restores its shards and
    evaluates its rows of the batches this process reads, as in training. The cluster the run
    trained on is not assumed: by default it runs on ``devices`` (this process's). ``echo`` hears
    what is evaluated. Returns (the checkpoint's step, the loss)."""
    saved = dataclasses.replace(source_config(run_dir), run_dir=absolute_source(run_dir), cluster=ClusterConfig())
    config = apply_overrides(saved, overrides)
    folder = hf_folder(run_dir)
    if folder is None:
        step = Checkpointer(checkpoint_dir(run_dir, config.checkpoint), read_only=True).complete_step(step, run_dir)
    elif config.data.check_tokenizer:  # a Hugging Face folder: its weights, step 0
        raise_problems(tokenizer_problems(folder, dataset_path(config.data.path)))
    runtime: Runtime | None = None
    try:
        runtime, devices, device_count = head_runtime(config, devices, echo)
        axis_sizes = validate(config, device_count)
        data_path, data, problems = open_split(config.data.path, split, config.seq_len, config.model.vocab_size)
        raise_problems(problems)
        runtime = runtime or HostRuntime(config, devices)
        step = runtime.load_params(step)
        t = config.train
        echo(f"fax: step {step} of {run_dir}, {split} split of {data_path}: {t.eval_batches} batches of "
             f"{t.batch_size} x {config.seq_len} tokens on {device_count} device(s), mesh {mesh_desc(axis_sizes)}")
        held_out = data.sampler(data_path, config)
        batches = (held_out.batch(i) for i in tqdm(range(t.eval_batches), desc="eval", unit="batch", leave=False))
        return step, runtime.evaluate(batches)
    finally:
        if runtime is not None:
            runtime.close()
