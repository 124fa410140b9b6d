"""The training loop behind ``fax train`` and ``fax.Trainer``: one step after another on a runtime
(local or Ray), with logging, evaluation, checkpointing, profiling and preemption as hooks."""

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
from tqdm.auto import tqdm

from fax import models
from fax.checkpoint import CheckpointDamaged, Checkpointer, checkpoint_dir, incompatible_keys
from fax.cluster import WorkerFailure
from fax.config import Config, ConfigError, apply_overrides, raise_problems, validate, with_layout
from fax.data import TokenDataset, copy_tokenizer, dataset_path, open_split
from fax.interop.hf import init_from_dir, init_model
from fax.interop.sources import tokenizer_problems
from fax.metrics import mesh_desc, mfu, peak_flops_per_device, read_metrics
from fax.parallel.planner import Plan
from fax.signals import handling
from fax.train import step as step_lib
from fax.train.hooks import Checkpointing, Evaluation, Every, Logging, LoopHook, Profiling, loggers
from fax.train.planning import laid_out, read_layout
from fax.train.runtime import HostRuntime, Runtime

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; run again to resume


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir: str):
        self.step = step
        super().__init__(f"stopped by a signal at step {step}; a checkpoint of that step is saved. Resume with: "
                         f"fax train --config {Path(run_dir) / 'config.yaml'}")


def format_record(record: dict[str, Any]) -> str:
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


def head_runtime(config: Config, devices: Sequence[jax.Device] | None,
                 echo: Callable[[str], None]) -> tuple[Runtime | None, list[jax.Device], int]:
    """Where a run's processes are: in Ray mode the head's runtime over the hosts (connected now,
    for their device count); else none yet, and this process's ``devices`` (default: all). Returns
    (the Ray runtime or None, the local devices, the device count)."""
    if config.cluster.ray:
        from fax.train.ray_runtime import RayRuntime  # Ray is imported only where it is used

        runtime = RayRuntime(config, echo)
        return runtime, [], runtime.device_count
    local = list(jax.devices() if devices is None else devices)
    return None, local, len(local)



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
        if config.init_from:  # before planning and validation: the checkpoint sets the shape
            try:
                config = dataclasses.replace(config, model=init_model(config.init_from, config.model))
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"init_from={config.init_from!r}: {e}") from None
            if config.data.check_tokenizer:  # before anything compiles
                raise_problems(tokenizer_problems(Path(init_from_dir(config.init_from)),
                                                  dataset_path(config.data.path)))
        self.echo = echo
        self.runtime: Runtime | None = None
        self.plan: Plan | None = None
        if config.cluster.ray and config.plan == "auto":
            raise ConfigError("plan='auto' compiles candidates on this process's devices, which a Ray head "
                              "does not have; write a plan with `fax plan --cluster ... --json > plan.json` "
                              "and pass plan=plan.json")
        if config.cluster.ray and config.plan:
            config = with_layout(config, read_layout(config.plan))
        self.runtime, self.devices, n_devices = head_runtime(config, devices, echo)
        if config.plan and not config.cluster.ray:
            config, self.plan = laid_out(config, self.devices, echo)
        self.config = config
        try:
            self.axis_sizes = validate(config, n_devices)
            raise_problems(self._data_and_resume_problems())
        except BaseException:
            if self.runtime is not None:
                self.runtime.close()  # a Ray head lets its cluster go before it refuses
            raise
        self.hooks: list[LoopHook] = []
        self.history: list[dict[str, Any]] = []
        self.restarts: list[str] = []

    def _data_and_resume_problems(self) -> list[str]:
        """Opens the training split; what keeps it, the validation split or the run directory's
        checkpoints from feeding this run (all checked before anything compiles)."""
        config = self.config
        self.data_path, self.dataset, problems = open_split(config.data.path, "train", config.seq_len,
                                                            config.model.vocab_size)
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
            elif (saved := self._newest_meta(checkpoints)) is not None:
                differs = incompatible_keys(saved["config"], config.to_dict())
                if differs:
                    problems.append(f"cannot resume from run_dir={config.run_dir!r}, the model differs: "
                                    f"{'; '.join(differs)}. Use the saved settings or a new run_dir")
        return problems

    def _newest_meta(self, checkpoints: Checkpointer) -> dict[str, Any] | None:
        """The meta of the newest checkpoint whose meta reads (a damaged one is reported at resume)."""
        for step in reversed(checkpoints.steps()):
            try:
                return checkpoints.meta(step)
            except CheckpointDamaged:
                continue
        return None

    def _resume(self, checkpoints: Checkpointer) -> tuple[int | None, float]:
        """Start the runtime from the newest intact checkpoint (none: fresh). A damaged one is named,
        then the next older is tried, unless checkpoint.fallback is false; (its step, seconds)."""
        steps = list(reversed(checkpoints.steps()))
        for i, step in enumerate(steps):
            try:
                return step, self.runtime.start(step)
            except CheckpointDamaged as e:  # from this process, or re-raised from a Ray worker's
                reason = getattr(e, "reason", str(e))
                if not self.config.checkpoint.fallback:
                    raise CheckpointDamaged(step, f"{reason}. checkpoint.fallback=false: resume from an older "
                                                  "step by deleting this one, or set checkpoint.fallback=true") from e
                if i + 1 == len(steps):
                    raise CheckpointDamaged(step, f"{reason}; no intact checkpoint is left in "
                                                  f"run_dir={self.config.run_dir!r}: train in a new run_dir") from e
                self.echo(f"fax: the checkpoint of step {step} is damaged: {reason}; resuming from the checkpoint "
                          f"of step {steps[i + 1]} instead")
        return None, self.runtime.start(None)

    def _checkpoints(self) -> Checkpointer:
        """A read-only view of the run's checkpoints, as they are now (the writers live in the runtime)."""
        return Checkpointer(checkpoint_dir(self.config.run_dir, self.config.checkpoint), read_only=True)

    def add_hook(self, every: int, fn: Callable[[int, dict[str, Any]], None]) -> None:
        """Call ``fn(step, record)`` every ``every`` steps (after evaluation and logging)."""
        self.hooks.append(Every(every, fn))

    def add_loop_hook(self, hook: LoopHook) -> None:
        """A hook of its own kind (``fax.train.hooks.LoopHook``), run after the built-in ones."""
        self.hooks.append(hook)

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
        # From here SIGTERM/SIGINT only set an event, read at safe points: after start-up (build, restore,
        # compile), which then ends the run cleanly, and after each step, which saves first. (Raised in the
        # middle of a compile, an interrupt could leave XLA's threads to crash the process at exit.)
        with _stop_on_signals() as stop:
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
                    self._run(last, stop)
                    break
                except WorkerFailure as failure:
                    if len(self.restarts) >= cfg.cluster.max_restarts:
                        raise RuntimeError(f"giving up after {len(self.restarts)} restarts (cluster.max_restarts="
                                           f"{cfg.cluster.max_restarts}): {failure}") from failure
                    self.restarts.append(str(failure))
                    self.echo(f"fax: restart {len(self.restarts)}/{cfg.cluster.max_restarts}: {failure}; "
                              "starting fresh workers from the latest complete checkpoint")
                    self.runtime.restart()
        return self.history

    def _run(self, last: int, stop: threading.Event) -> None:
        """Start (or restart) the runtime from the latest complete checkpoint and train to ``last``,
        ending cleanly once ``stop`` is set."""
        cfg, t, runtime = self.config, self.config.train, self.runtime
        checkpoints = self._checkpoints()
        for name in checkpoints.partial():
            self.echo(f"fax: ignoring incomplete checkpoint {name} (a save that never finished; left in place)")
        resume, seconds = self._resume(checkpoints)
        if stop.is_set():
            if resume is not None:
                raise Preempted(resume, cfg.run_dir)
            self.echo("fax: stopped by a signal during start-up, before the first step (nothing was saved)")
            raise KeyboardInterrupt
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
        self.history = [r for r in self.history if r["step"] <= first]
        train_batches = self.dataset.sampler(self.data_path, cfg)
        tokens_per_step = t.batch_size * seq_len
        batch = train_batches.batch(first)
        window_start, window_steps = time.perf_counter(), 0
        with tqdm(total=t.steps, initial=first, desc="train", unit="step", disable=None) as bar:
            hooks = self._loop_hooks(runtime, traced, info, kept, bar)
            lost_hosts = False
            try:
                for s in range(first, last):
                    done = s + 1
                    for hook in hooks:
                        hook.before(done)
                    handle = runtime.submit(batch)
                    if done < last:  # the next batch is built while this step runs
                        batch = train_batches.batch(done)
                    bar.update(1)
                    window_steps += 1
                    stopping = stop.is_set()  # read once: a signal arriving later is handled next step
                    final = done == last or stopping
                    due = [hook for hook in hooks if hook.due(done, final)]
                    if not due:
                        continue
                    values = runtime.metrics(handle)  # waits for this step
                    step_time = (time.perf_counter() - window_start) / window_steps
                    record = {"step": done, **values, "tokens_per_s": tokens_per_step / step_time,
                              "step_time_s": step_time}
                    record["mfu"] = mfu(flops_per_token, record["tokens_per_s"], peak, n_dev)
                    for hook in due:
                        hook(done, record, final)
                    window_start, window_steps = time.perf_counter(), 0  # hooks' time is not step time
                    if stopping:
                        raise Preempted(done, cfg.run_dir)
            except WorkerFailure:
                lost_hosts = True
                raise
            finally:
                for hook in hooks:
                    hook.close(lost_hosts)
        runtime.wait()

    def _loop_hooks(self, runtime: Runtime, traced: range, info: dict[str, Any], kept: list[dict[str, Any]],
                    bar: tqdm) -> list[LoopHook]:
        """The built-in hooks, in the order they run after a step, then the user's."""
        cfg, t = self.config, self.config.train
        hooks: list[LoopHook] = [Profiling(runtime, traced, _above(bar, self.echo))]
        if t.eval_every:  # the same validation batches at every evaluation
            held_out = TokenDataset.open(self.data_path, "val").sampler(self.data_path, cfg)
            hooks.append(Evaluation(runtime, [held_out.batch(i) for i in range(t.eval_batches)], t.eval_every))

        def show(record: dict[str, Any]) -> None:
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", mfu=f"{100 * record['mfu']:.1f}%")
            _above(bar, self.echo)(format_record(record))

        hooks.append(Logging(loggers(cfg, kept), t.log_every, t.eval_every, show))
        hooks.append(Checkpointing(runtime, cfg.checkpoint.every_n_steps, lambda step, r: self._meta(step, r, info),
                                   self.echo))
        return hooks + self.hooks

    def _meta(self, step: int, record: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint records beside the arrays (readable JSON)."""
        return {"format": "fax-checkpoint-v1", "step": step, "config": self.config.to_dict(),
                "sampler": {"seed": self.config.seed, "next_step": step}, "mesh": self.axis_sizes,
                "devices": info["devices"], "device_kind": info["device_kind"],
                "process_count": info["process_count"], "metrics": record, "saved_at": time.time()}

    def close(self) -> None:
        """Finish pending checkpoint writes; in Ray mode, stop the workers."""
        if self.runtime is not None:
            self.runtime.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
