"""The training loop behind ``fax train`` and ``fax.Trainer``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import models
from fax import step as step_lib
from fax.config import Config, ConfigError, apply_overrides, validate
from fax.data import Sampler, TokenDataset, dataset_problems, default_corpus, get_tokenizer
from fax.metrics import MetricsLog, mfu, peak_flops_per_device
from fax.sample import generate
from parallel import make_mesh

Hook = Callable[[int, dict[str, Any]], None]


def _format(record: dict[str, Any]) -> str:
    return (f"step {record['step']:>6}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
            f"lr {record['lr']:.2e}  tokens/s {record['tokens_per_s']:,.0f}  mfu {100 * record['mfu']:.2f}%")


class Trainer:
    """``Trainer(config).fit()`` trains and returns the logged metrics, one dict per logged step.

    Settings are validated here, before anything compiles. ``add_hook(every, fn)`` calls
    ``fn(step, metrics)`` every ``every`` steps.
    """

    def __init__(self, config: Config | None = None, *, overrides: Sequence[str] = (),
                 devices: Sequence[jax.Device] | None = None, echo: Callable[[str], None] = print):
        config = config or Config()
        if overrides:
            config = apply_overrides(config, overrides)
        self.config = config
        self.devices = list(jax.devices() if devices is None else devices)
        self.echo = echo
        self.axis_sizes = validate(config, len(self.devices))
        self.data_path = Path(config.data.path) if config.data.path else default_corpus()
        problems = dataset_problems(self.data_path, config.seq_len)
        self.dataset = None if problems else TokenDataset.open(self.data_path)
        if self.dataset is not None and self.dataset.meta["vocab_size"] > config.model.vocab_size:
            problems.append(f"the dataset's tokenizer has {self.dataset.meta['vocab_size']} tokens but "
                            f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.hooks: list[tuple[int, Hook]] = []
        self.state: step_lib.State | None = None

    def add_hook(self, every: int, fn: Hook) -> None:
        if every <= 0:
            raise ValueError(f"hook interval must be positive, got {every}")
        self.hooks.append((every, fn))

    def fit(self) -> list[dict[str, Any]]:
        cfg, t = self.config, self.config.train
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        mesh = make_mesh(cfg.parallel, self.devices)
        seq_len, n_dev = cfg.seq_len, len(self.devices)
        flops_per_token = models.train_flops_per_token(cfg.model, seq_len)
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        peak = t.peak_flops_per_device or peak_flops_per_device(self.devices[0], len(local))
        mesh_desc = " x ".join(f"{k}={v}" for k, v in self.axis_sizes.items() if v > 1) or "1 device"
        self.echo(f"fax: {models.param_count(cfg.model) / 1e6:.2f}M params on {n_dev} {self.devices[0].device_kind} "
                  f"device(s), mesh {mesh_desc}; {t.batch_size} x {seq_len} tokens/step; run dir {run_dir}")

        training = step_lib.build(cfg, mesh)
        started = time.perf_counter()
        state = training.init()
        batch_spec = jax.ShapeDtypeStruct((t.batch_size, seq_len + 1), np.int32, sharding=training.batch_sharding)
        compiled = training.step.lower(state, batch_spec).compile()
        self.echo(f"fax: initialised and compiled in {time.perf_counter() - started:.1f}s")

        sampler = Sampler(self.dataset, t.batch_size, seq_len, cfg.seed)
        tokens_per_step = t.batch_size * seq_len
        history: list[dict[str, Any]] = []
        log = MetricsLog(run_dir / "metrics.jsonl")
        log.path.write_text("")  # a fresh run: resume arrives with checkpoints
        next_batch = jax.device_put(sampler.batch(0), training.batch_sharding)
        window_start, window_steps = time.perf_counter(), 0
        with tqdm(total=t.steps, desc="train", unit="step", disable=None) as bar:
            for s in range(t.steps):
                state, metrics = compiled(state, next_batch)
                if s + 1 < t.steps:  # the next batch goes out while this step runs
                    next_batch = jax.device_put(sampler.batch(s + 1), training.batch_sharding)
                bar.update(1)
                window_steps += 1
                done = s + 1
                due = [fn for every, fn in self.hooks if done % every == 0]
                if done % t.log_every and done != t.steps and not due:
                    continue
                values = jax.device_get(metrics)  # waits for this step
                now = time.perf_counter()
                step_time = (now - window_start) / window_steps
                record = {"step": done, **{k: float(v) for k, v in values.items()},
                          "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time}
                record["mfu"] = mfu(flops_per_token, record["tokens_per_s"], peak, n_dev)
                window_start, window_steps = now, 0
                if done % t.log_every == 0 or done == t.steps:
                    history.append(record)
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", mfu=f"{100 * record['mfu']:.1f}%")
                    bar.write(_format(record)) if not bar.disable else self.echo(_format(record))
                for fn in due:
                    fn(done, record)
        log.close()
        self.state, self.training = state, training
        if t.sample_tokens:
            self.echo("fax: sample ->\n" + self.sample(t.sample_prompt, t.sample_tokens))
        return history

    def sample(self, prompt: str, new_tokens: int, temperature: float = 0.8) -> str:
        """Continue ``prompt`` with the trained model (after fit)."""
        if self.state is None:
            raise RuntimeError("call fit() before sample()")
        tok = get_tokenizer(self.dataset.meta["tokenizer"])
        ids = generate(self.training.graphdef, self.state["params"], tok.encode(prompt), new_tokens,
                       window=self.config.seq_len, temperature=temperature, seed=self.config.seed,
                       vocab_limit=tok.eos_id)
        return prompt + tok.decode(ids)

