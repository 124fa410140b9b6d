"""The training loop behind ``fax train`` and ``fax.Trainer``."""

from __future__ import annotations

import dataclasses
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
from fax.checkpoint import Checkpointer, abstract_like, checkpoint_dir, incompatible_keys
from fax.config import (ClusterConfig, Config, ConfigError, apply_overrides, raise_problems, run_config,
                        setting_problems, validate, with_layout)
from fax.data import Sampler, TokenDataset, copy_tokenizer, dataset_path, dataset_problems
from fax.metrics import MetricsLog, mesh_desc, mfu, peak_flops_per_device, read_metrics
from fax.runtime import HostRuntime, WorkerFailure
from fax.signals import handling
from parallel import make_mesh
from parallel.cost import Candidate
from parallel.hardware import present_cluster
from parallel.planner import Plan, load_layout
from parallel.planner import plan as plan_layouts
from parallel.planner import validate as validate_plan

Hook = Callable[[int, dict[str, Any]], None]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; run again to resume


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir: str):
        self.step = step
        super().__init__(f"stopped by a signal at step {step}; a checkpoint of that step is saved. Resume with: "
                         f"fax train --config {Path(run_dir) / 'config.yaml'}")


def _format(record: dict[str, Any]) -> str:
    val = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
    return (f"step {record['step']:>6}  loss {record['loss']:.4f}{val}  grad_norm {record['grad_norm']:.3f}  "
            f"lr {record['lr']:.2e}  tokens/s {record['tokens_per_s']:,.0f}  mfu {100 * record['mfu']:.2f}%")


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT while the block runs."""
    stop = threading.Event()
    with handling(lambda *_: stop.set(), signal.SIGTERM, signal.SIGINT):
        yield stop


def _above(bar: tqdm, echo: Callable[[str], None]) -> Callable[[str], None]:
    """Where a line goes while a progress bar runs: above the bar, or to ``echo`` when it is off."""
    return bar.write if not bar.disable else echo


class _StepTrace:
    """The JAX profiler over the steps of ``window`` (1-based) that a loop runs, on every process of
    the runtime: on just before the first of them is submitted, off after the last (``ends``) or
    when the loop ends first (a stop, a failure)."""

    def __init__(self, runtime: Any, window: range, echo: Callable[[str], None]):
        self.runtime, self.window, self.echo = runtime, window, echo
        self.first: int | None = None  # while tracing: the first traced step
        self.step = 0  # the last step submitted

    def before(self, step: int) -> None:
        if self.first is None and step in self.window:
            self.runtime.start_profile()
            self.first = step
        self.step = step

    def ends(self, step: int) -> bool:
        """Whether the trace is due to stop after ``step``."""
        return self.first is not None and step == self.window[-1]

    def stop(self) -> None:
        where = self.runtime.stop_profile()
        steps = f"step {self.step}" if self.first == self.step else f"steps {self.first}-{self.step}"
        self.echo(f"fax: profiled {steps} -> {where}; open it with tensorboard --logdir, or a "
                  "perfetto_trace.json.gz at ui.perfetto.dev")
        self.first = None

    def __enter__(self) -> _StepTrace:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.first is not None and not (kind and issubclass(kind, WorkerFailure)):  # lost hosts write nothing
            self.stop()


PLAN_CANDIDATES = 50  # ranked layouts kept for compile validation


def _load_layout(path: str) -> Candidate:
    try:
        return load_layout(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"plan={path!r} is not a readable plan ({e}); write one with `fax plan ... --json`") from None


def sampler(config: Config, data: TokenDataset, data_path: Path) -> Sampler:
    """The batches ``config`` trains on, drawn from ``data``; under ``data.document_mask`` the
    tokens ending a document flagged for the step."""
    end = data.tokenizer(data_path).eos_id if config.data.document_mask else None
    return Sampler(data, config.train.batch_size, config.seq_len, config.seed, end)


def evaluate_checkpoint(run_dir: str | Path, overrides: Sequence[str] = (), step: int | None = None,
                        split: str = "val", devices: list[jax.Device] | None = None,
                        echo: Callable[[str], None] = lambda _: None) -> tuple[int, float]:
    """The mean cross-entropy of a run's checkpoint (default: its latest) on ``train.eval_batches``
    batches of a dataset split: with the run's settings, the batches and the loss its ``val_loss``
    logs. ``overrides`` change the data, the batches or the mesh (any that fits the devices); with
    ``cluster.ray=true`` (and the other ``cluster.*`` settings) every host restores its shards and
    evaluates its rows of the batches this process reads, as in training. The cluster the run
    trained on is not assumed: by default it runs on ``devices`` (this process's). ``echo`` hears
    what is evaluated. Returns (the checkpoint's step, the loss)."""
    saved = dataclasses.replace(run_config(run_dir), run_dir=str(Path(run_dir).absolute()),
                                cluster=ClusterConfig())
    config = apply_overrides(saved, overrides)
    step = Checkpointer(checkpoint_dir(run_dir, config.checkpoint), read_only=True).complete_step(step, run_dir)
    runtime: Any = None
    try:
        if config.cluster.ray:
            from fax.cluster import RayRuntime

            runtime = RayRuntime(config, echo)
            device_count = runtime.device_count
        else:
            devices = list(jax.devices() if devices is None else devices)
            device_count = len(devices)
        axis_sizes = validate(config, device_count)
        data_path = dataset_path(config.data.path)
        problems = dataset_problems(data_path, config.seq_len, config.model.vocab_size)
        data = None if problems else TokenDataset.open(data_path, split)
        if data is not None and len(data.tokens) < config.seq_len + 1:
            problems.append(f"the {split} split of data.path={str(data_path)!r} holds {len(data.tokens)} tokens, "
                            f"fewer than one sequence ({config.seq_len + 1}); pick another data.path or split, or "
                            "lower train.seq_len")
        raise_problems(problems)
        runtime = runtime or HostRuntime(config, devices)
        runtime.load_params(step)
        t = config.train
        echo(f"fax: step {step} of {run_dir}, {split} split of {data_path}: {t.eval_batches} batches of "
             f"{t.batch_size} x {config.seq_len} tokens on {device_count} device(s), mesh {mesh_desc(axis_sizes)}")
        held_out = sampler(config, data, data_path)
        batches = (held_out.batch(i) for i in tqdm(range(t.eval_batches), desc="eval", unit="batch", leave=False))
        return step, runtime.evaluate(batches)
    finally:
        if runtime is not None:
            runtime.close()


def layout_compiler(config: Config, devices: list[jax.Device]) -> Callable[[Candidate], Any]:
    """Compiles ``config``'s train step under a layout, ahead of time (nothing allocated)."""
    def compile_layout(layout: Candidate) -> Any:
        cfg = with_layout(config, layout)
        training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
        state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
        return step_lib.compile_step(training, state, (cfg.train.batch_size, cfg.seq_len + 1))
    return compile_layout


def timed_steps(training: step_lib.ShardedTraining, cfg: Config, steps: int) -> tuple[step_lib.State, list[float]]:
    """Seconds of each of ``steps`` train steps from a fresh state on one batch of random tokens,
    after a warm-up step that compiles; and the state they leave."""
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.seq_len + 1))
    tokens = jax.device_put(tokens.astype(np.int32), training.batch_sharding)
    state, metrics = training.step(training.init(), tokens)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = training.step(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return state, times


def layout_timer(config: Config, devices: list[jax.Device], steps: int = 5) -> Callable[[Candidate], float]:
    """Seconds of the fastest of ``steps`` real train steps of ``config`` under a layout (after one
    warm-up step): the least disturbed by other work on a shared machine."""
    def time_layout(layout: Candidate) -> float:
        cfg = with_layout(config, layout)
        return min(timed_steps(step_lib.build(cfg, make_mesh(cfg.parallel, devices)), cfg, steps)[1])
    return time_layout


def plan_here(config: Config, devices: list[jax.Device], name: str = "", top: int = PLAN_CANDIDATES,
              validate: int = 1, measure: bool = False) -> Plan:
    """Plan ``config``'s model and batch for ``devices``, then compile the ranked layouts until ``validate``
    fit (timing each with ``measure``); raises ConfigError before any compile on bad settings."""
    raise_problems(setting_problems(config))  # the layout's own problems are the planner's to avoid
    cluster = present_cluster(devices)
    try:
        result = plan_layouts(config.model, cluster, config.train.batch_size, config.seq_len, name, top=top)
        return validate_plan(result, layout_compiler(config, devices), cluster.device.hbm_bytes, k=validate,
                             measure=layout_timer(config, devices) if measure else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def laid_out(config: Config, devices: list[jax.Device], echo: Callable[[str], None]) -> tuple[Config, Plan | None]:
    """``config`` with the layout ``config.plan`` names: a plan file, or ``auto``: plan for these devices,
    compile the ranked layouts until one fits, take it (the plan is returned to be saved)."""
    if config.plan != "auto":
        return with_layout(config, _load_layout(config.plan)), None
    result = plan_here(config, devices)
    best, compiled = result.best, result.validated[-1]
    echo(f"fax: plan=auto picked {best.candidate.describe()} of {result.searched} layouts on {result.cluster}: "
         f"predicted {best.step_s * 1e3:.1f} ms/step and {best.memory_bytes / 2 ** 20:.0f} MiB/device, "
         f"compiled {compiled.memory_bytes / 2 ** 20:.0f} MiB/device")
    return with_layout(config, best.candidate), result


class Trainer:
    """``Trainer(config).fit()`` trains and returns the logged metrics, one dict per logged step.

    Settings are validated here, before anything compiles; a run directory with checkpoints is
    resumed from its latest complete one. ``add_hook(every, fn)`` calls ``fn(step, metrics)``
    every ``every`` steps. With ``cluster.ray=true`` this process is the head of a Ray-mode run
    (fax.cluster): the same loop, with the steps running on one actor per host.
    """

    def __init__(self, config: Config | None = None, *, overrides: Sequence[str] = (), plan: str | None = None,
                 devices: Sequence[jax.Device] | None = None, echo: Callable[[str], None] = print):
        config = config or Config()
        if overrides:
            config = apply_overrides(config, overrides)
        if plan is not None:
            config = dataclasses.replace(config, plan=plan)
        if config.init_from:
            from fax.hf import init_model  # before planning and validation: the checkpoint sets the shape

            try:
                config = dataclasses.replace(config, model=init_model(config.init_from, config.model))
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"init_from={config.init_from!r}: {e}") from None
        self.echo = echo
        self.runtime: Any = None
        self.plan: Plan | None = None
        if config.cluster.ray:
            from fax.cluster import RayRuntime  # Ray is imported only where it is used

            if config.plan == "auto":
                raise ConfigError("plan='auto' compiles candidates on this process's devices, which a Ray head "
                                  "does not have; write a plan with `fax plan --cluster ... --json > plan.json` "
                                  "and pass plan=plan.json")
            if config.plan:
                config = with_layout(config, _load_layout(config.plan))
            self.runtime = RayRuntime(config, echo)
            n_devices = self.runtime.device_count
        else:
            self.devices = list(jax.devices() if devices is None else devices)
            n_devices = len(self.devices)
            if config.plan:
                config, self.plan = laid_out(config, self.devices, echo)
        self.config = config
        self.axis_sizes = validate(config, n_devices)
        self.data_path = dataset_path(config.data.path)
        problems = dataset_problems(self.data_path, config.seq_len, config.model.vocab_size)
        self.dataset = None if problems else TokenDataset.open(self.data_path)
        val_tokens = self.dataset.meta.get("val_tokens", 0) if self.dataset is not None else None
        if config.train.eval_every and val_tokens is not None and val_tokens < config.seq_len + 1:
            problems.append(f"train.eval_every={config.train.eval_every} needs a validation split of at least one "
                            f"sequence ({config.seq_len + 1} tokens), but data.path={str(self.data_path)!r} has "
                            f"{val_tokens}; prepare it with `fax prepare --val-fraction 0.05`, or train.eval_every=0")
        checkpoints = self._checkpoints()
        self.resume_step = checkpoints.latest_step()
        if self.resume_step is not None:
            if not config.resume:
                problems.append(f"run_dir={config.run_dir!r} holds checkpoints (latest step {self.resume_step}) "
                                "but resume=false; choose a new run_dir, or resume=true to continue")
            else:
                differs = incompatible_keys(checkpoints.meta(self.resume_step)["config"], config.to_dict())
                if differs:
                    problems.append(f"cannot resume from run_dir={config.run_dir!r}, the model differs: "
                                    f"{'; '.join(differs)}. Use the saved settings or a new run_dir")
        if problems:
            if self.runtime is not None:
                self.runtime.close()
            raise_problems(problems)
        self.hooks: list[tuple[int, Hook]] = []
        self.history: list[dict[str, Any]] = []
        self.restarts: list[str] = []

    def _checkpoints(self) -> Checkpointer:
        """A read-only view of the run's checkpoints, as they are now (the writers live in the runtime)."""
        return Checkpointer(checkpoint_dir(self.config.run_dir, self.config.checkpoint), read_only=True)

    def add_hook(self, every: int, fn: Hook) -> None:
        if every <= 0:
            raise ValueError(f"hook interval must be positive, got {every}")
        self.hooks.append((every, fn))

    @property
    def state(self) -> step_lib.State | None:
        """The local train state (local mode; in Ray mode the state lives on the hosts)."""
        return getattr(self.runtime, "state", None)

    @property
    def training(self) -> step_lib.ShardedTraining:
        return self.runtime.training

    def fit(self, until_step: int | None = None) -> list[dict[str, Any]]:
        """Train to ``train.steps`` (or stop early at ``until_step``, saving a checkpoint there).

        In Ray mode a worker that dies or hangs costs a restart: fresh actors restore the latest
        complete checkpoint and the run goes on, at most ``cluster.max_restarts`` times."""
        cfg = self.config
        last = min(until_step or cfg.train.steps, cfg.train.steps)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if self.dataset.meta["tokenizer"] != "byte":  # generate and serve decode with the run's own copy
            copy_tokenizer(self.data_path / self.dataset.meta["tokenizer"], run_dir)
        if self.plan is not None:
            (run_dir / "plan.json").write_text(self.plan.to_json())
        if self.runtime is None:
            self.runtime = HostRuntime(cfg, self.devices)
        while True:
            try:
                self._run(last)
                break
            except WorkerFailure as failure:
                if len(self.restarts) >= cfg.cluster.max_restarts:
                    raise RuntimeError(f"giving up after {len(self.restarts)} restarts "
                                       f"(cluster.max_restarts={cfg.cluster.max_restarts}): {failure}") from failure
                self.restarts.append(str(failure))
                self.echo(f"fax: restart {len(self.restarts)}/{cfg.cluster.max_restarts}: {failure}; "
                          "starting fresh workers from the latest complete checkpoint")
                self.runtime.restart()
        if cfg.train.sample_tokens and last == cfg.train.steps:
            self.echo("fax: sample ->\n" + self.sample(cfg.train.sample_prompt, cfg.train.sample_tokens))
        return self.history

    def _run(self, last: int) -> None:
        """Start (or restart) the runtime from the latest complete checkpoint and train to ``last``."""
        cfg, t, runtime = self.config, self.config.train, self.runtime
        checkpoints = self._checkpoints()
        for name in checkpoints.partial():
            self.echo(f"fax: ignoring incomplete checkpoint {name} (a save that never finished; left in place)")
        resume = checkpoints.latest_step()
        seconds = runtime.start(resume)
        first = 0 if resume is None else resume
        if resume is not None:
            self.echo(f"fax: resumed from the checkpoint of step {resume}")
        traced = range(t.profile_from, t.profile_from + t.profile_steps)
        if traced and first >= traced[-1]:
            self.echo(f"fax: no profile this time: steps {traced[0]}-{traced[-1]} (train.profile_from, profile_steps) "
                      f"come before step {first + 1}, where this run resumes")
        info = runtime.describe()
        seq_len, n_dev = cfg.seq_len, info["devices"]
        hosts = f" on {info['process_count']} hosts" if info["process_count"] > 1 else ""
        self.echo(f"fax: {models.param_count(cfg.model) / 1e6:.2f}M params on {n_dev} {info['device_kind']} "
                  f"device(s){hosts}, mesh {mesh_desc(self.axis_sizes)}; {t.batch_size} x {seq_len} tokens/step; "
                  f"run dir {cfg.run_dir}; initialised and compiled in {seconds:.1f}s")
        flops_per_token = models.train_flops_per_token(cfg.model, seq_len)
        peak = t.peak_flops_per_device or peak_flops_per_device(info["device_kind"], info["platform"],
                                                                info["local_devices"])
        log_path = Path(cfg.run_dir) / "metrics.jsonl"
        kept = [r for r in read_metrics(log_path) if r["step"] <= first] if first and log_path.exists() else []
        log = MetricsLog(log_path, keep=kept)  # a resumed run drops what it logged past its checkpoint
        self.history = [r for r in self.history if r["step"] <= first]
        train_batches = sampler(cfg, self.dataset, self.data_path)
        if t.eval_every:  # the same validation batches at every evaluation
            held_out = sampler(cfg, TokenDataset.open(self.data_path, "val"), self.data_path)
            val_batches = [held_out.batch(i) for i in range(t.eval_batches)]
        tokens_per_step = t.batch_size * seq_len
        every_save = cfg.checkpoint.every_n_steps
        batch = train_batches.batch(first)
        window_start, window_steps = time.perf_counter(), 0
        with (_stop_on_signals() as stop,
              tqdm(total=t.steps, initial=first, desc="train", unit="step", disable=None) as bar,
              _StepTrace(runtime, traced, _above(bar, self.echo)) as trace):
            for s in range(first, last):
                done = s + 1
                trace.before(done)
                handle = runtime.submit(batch)
                if done < last:  # the next batch is built while this step runs
                    batch = train_batches.batch(done)
                bar.update(1)
                window_steps += 1
                stopping = stop.is_set()  # read once: a signal arriving later is handled next step
                log_due = done % t.log_every == 0 or done == last
                save_due = (every_save and done % every_save == 0) or done == last or stopping
                hooks_due = [fn for every, fn in self.hooks if done % every == 0]
                eval_due = t.eval_every and (done % t.eval_every == 0 or done == last)
                trace_due = trace.ends(done)
                if not (log_due or save_due or hooks_due or eval_due or trace_due):
                    continue
                values = runtime.metrics(handle)  # waits for this step
                now = time.perf_counter()
                step_time = (now - window_start) / window_steps
                record = {"step": done, **values, "tokens_per_s": tokens_per_step / step_time,
                          "step_time_s": step_time}
                record["mfu"] = mfu(flops_per_token, record["tokens_per_s"], peak, n_dev)
                if eval_due:
                    record["val_loss"] = runtime.evaluate(val_batches)
                    log_due = True  # a validation loss is always logged
                if log_due:
                    self.history.append(record)
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", mfu=f"{100 * record['mfu']:.1f}%")
                    _above(bar, self.echo)(_format(record))
                for fn in hooks_due:
                    fn(done, record)
                if save_due:
                    runtime.save(self._meta(done, record, info), wait=done == last or stopping)
                if trace_due:
                    trace.stop()
                window_start, window_steps = time.perf_counter(), 0  # saves, hooks, traces are not step time
                if stopping:
                    log.close()
                    raise Preempted(done, cfg.run_dir)
        log.close()
        runtime.wait()

    def _meta(self, step: int, record: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint records beside the arrays (readable JSON)."""
        return {"format": "fax-checkpoint-v1", "step": step, "config": self.config.to_dict(),
                "sampler": {"seed": self.config.seed, "next_step": step}, "mesh": self.axis_sizes,
                "devices": info["devices"], "device_kind": info["device_kind"],
                "process_count": info["process_count"], "metrics": record, "saved_at": time.time()}

    def sample(self, prompt: str, new_tokens: int, temperature: float = 0.8) -> str:
        """Continue ``prompt`` with the trained model (after fit)."""
        if not self.history:
            raise RuntimeError("call fit() before sample()")
        tok = self.dataset.tokenizer(self.data_path)
        ids = self.runtime.generate([int(i) for i in tok.encode(prompt)], new_tokens, temperature, tok.eos_id)
        return prompt + tok.decode(ids)

    def close(self) -> None:
        """Finish pending checkpoint writes; in Ray mode, stop the workers."""
        if self.runtime is not None:
            self.runtime.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
