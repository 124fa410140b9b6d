"""The training loop behind ``fax train`` and ``fax.Trainer``."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import models
from fax import step as step_lib
from fax.checkpoint import Checkpointer, checkpoint_dir, incompatible_keys
from fax.config import Config, ConfigError, apply_overrides, validate
from fax.data import Sampler, TokenDataset, dataset_problems, default_corpus, get_tokenizer
from fax.metrics import MetricsLog, mesh_desc, mfu, peak_flops_per_device, read_metrics
from fax.sample import generate
from parallel import make_mesh

Hook = Callable[[int, dict[str, Any]], None]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; run again to resume


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir: str):
        self.step = step
        super().__init__(f"stopped by a signal at step {step}; a checkpoint of that step is saved. Resume with: "
                         f"fax train --config {Path(run_dir) / 'config.yaml'}")


def _format(record: dict[str, Any]) -> str:
    return (f"step {record['step']:>6}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
            f"lr {record['lr']:.2e}  tokens/s {record['tokens_per_s']:,.0f}  mfu {100 * record['mfu']:.2f}%")


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT while the block runs (main thread only: signals go there)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """``Trainer(config).fit()`` trains and returns the logged metrics, one dict per logged step.

    Settings are validated here, before anything compiles; a run directory with checkpoints is
    resumed from its latest complete one. ``add_hook(every, fn)`` calls ``fn(step, metrics)``
    every ``every`` steps.
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
        self.checkpointer = Checkpointer(checkpoint_dir(config.run_dir, config.checkpoint), config.checkpoint)
        self.resume_step = self.checkpointer.latest_step()
        if self.resume_step is not None:
            if not config.resume:
                problems.append(f"run_dir={config.run_dir!r} holds checkpoints (latest step {self.resume_step}) "
                                "but resume=false; choose a new run_dir, or resume=true to continue")
            else:
                differs = incompatible_keys(self.checkpointer.meta(self.resume_step)["config"], config.to_dict())
                if differs:
                    problems.append(f"cannot resume from run_dir={config.run_dir!r}, the model differs: "
                                    f"{'; '.join(differs)}. Use the saved settings or a new run_dir")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.hooks: list[tuple[int, Hook]] = []
        self.state: step_lib.State | None = None

    def add_hook(self, every: int, fn: Hook) -> None:
        if every <= 0:
            raise ValueError(f"hook interval must be positive, got {every}")
        self.hooks.append((every, fn))

    def _start(self, training: step_lib.ShardedTraining) -> tuple[step_lib.State, int]:
        """A fresh state, or the latest complete checkpoint placed on this mesh."""
        for name in self.checkpointer.partial():
            self.echo(f"fax: ignoring incomplete checkpoint {name} (a save that never finished; left in place)")
        if self.resume_step is None:
            return training.init(), 0
        target = jax.eval_shape(training.init)
        state, meta = self.checkpointer.restore(self.resume_step, target, training.state_shardings)
        self.echo(f"fax: resumed from the checkpoint of step {meta['step']}")
        return state, int(meta["step"])

    def fit(self, until_step: int | None = None) -> list[dict[str, Any]]:
        """Train to ``train.steps`` (or stop early at ``until_step``, saving a checkpoint there)."""
        cfg, t = self.config, self.config.train
        last = min(until_step or t.steps, t.steps)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        mesh = make_mesh(cfg.parallel, self.devices)
        seq_len, n_dev = cfg.seq_len, len(self.devices)
        flops_per_token = models.train_flops_per_token(cfg.model, seq_len)
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        peak = t.peak_flops_per_device or peak_flops_per_device(self.devices[0], len(local))
        self.echo(f"fax: {models.param_count(cfg.model) / 1e6:.2f}M params on {n_dev} {self.devices[0].device_kind} "
                  f"device(s), mesh {mesh_desc(self.axis_sizes)}; {t.batch_size} x {seq_len} tokens/step; run dir {run_dir}")

        training = step_lib.build(cfg, mesh)
        started = time.perf_counter()
        state, first = self._start(training)
        batch_spec = jax.ShapeDtypeStruct((t.batch_size, seq_len + 1), np.int32, sharding=training.batch_sharding)
        compiled = training.step.lower(state, batch_spec).compile()
        self.echo(f"fax: initialised and compiled in {time.perf_counter() - started:.1f}s")

        log_path = run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(log_path) if r["step"] <= first] if first and log_path.exists() else []
        log = MetricsLog(log_path, keep=kept)  # a resumed run drops what it logged past its checkpoint
        sampler = Sampler(self.dataset, t.batch_size, seq_len, cfg.seed)
        tokens_per_step = t.batch_size * seq_len
        history: list[dict[str, Any]] = []
        every_save = cfg.checkpoint.every_n_steps
        next_batch = jax.device_put(sampler.batch(first), training.batch_sharding)
        window_start, window_steps = time.perf_counter(), 0
        with _stop_on_signals() as stop, tqdm(total=t.steps, initial=first, desc="train", unit="step",
                                               disable=None) as bar:
            for s in range(first, last):
                state, metrics = compiled(state, next_batch)
                if s + 1 < last:  # the next batch goes out while this step runs
                    next_batch = jax.device_put(sampler.batch(s + 1), training.batch_sharding)
                bar.update(1)
                window_steps += 1
                done = s + 1
                stopping = stop.is_set()  # read once: a signal arriving later is handled next step
                log_due = done % t.log_every == 0 or done == last
                save_due = (every_save and done % every_save == 0) or done == last or stopping
                hooks_due = [fn for every, fn in self.hooks if done % every == 0]
                if not (log_due or save_due or hooks_due):
                    continue
                values = jax.device_get(metrics)  # waits for this step
                now = time.perf_counter()
                step_time = (now - window_start) / window_steps
                record = {"step": done, **{k: float(v) for k, v in values.items()},
                          "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time}
                record["mfu"] = mfu(flops_per_token, record["tokens_per_s"], peak, n_dev)
                if log_due:
                    history.append(record)
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", mfu=f"{100 * record['mfu']:.1f}%")
                    bar.write(_format(record)) if not bar.disable else self.echo(_format(record))
                for fn in hooks_due:
                    fn(done, record)
                if save_due:
                    self.checkpointer.save(state, self._meta(done, record), wait=done == last or stopping)
                window_start, window_steps = time.perf_counter(), 0  # saves and hooks are not step time
                if stopping:
                    log.close()
                    raise Preempted(done, cfg.run_dir)
        log.close()
        self.checkpointer.wait()
        self.state, self.training = state, training
        if t.sample_tokens and last == t.steps:
            self.echo("fax: sample ->\n" + self.sample(t.sample_prompt, t.sample_tokens))
        return history

    def _meta(self, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint records beside the arrays (readable JSON)."""
        return {"format": "fax-checkpoint-v1", "step": step, "config": self.config.to_dict(),
                "sampler": {"seed": self.config.seed, "next_step": step}, "mesh": self.axis_sizes,
                "devices": len(self.devices), "device_kind": self.devices[0].device_kind,
                "process_count": jax.process_count(), "metrics": record, "saved_at": time.time()}

    def sample(self, prompt: str, new_tokens: int, temperature: float = 0.8) -> str:
        """Continue ``prompt`` with the trained model (after fit)."""
        if self.state is None:
            raise RuntimeError("call fit() before sample()")
        tok = get_tokenizer(self.dataset.meta["tokenizer"])
        ids = generate(self.training.graphdef, self.state["params"], tok.encode(prompt), new_tokens,
                       window=self.config.seq_len, temperature=temperature, seed=self.config.seed,
                       vocab_limit=tok.eos_id)
        return prompt + tok.decode(ids)
