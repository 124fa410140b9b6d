"""What the training loop does around its steps, each a hook registered on it: logging (JSONL,
TensorBoard, Weights & Biases), evaluation, checkpointing, profiling, and the user's own hooks.

After each step the loop asks every hook whether it is ``due``; only if one is does it wait for the
step's values, and then calls the due hooks in order with the step's record (a dict of metrics,
which a hook may add to: evaluation adds ``val_loss`` before logging writes the record).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fax.config import Config
from fax.data import Batch
from fax.metrics import MetricsLog
from fax.train.runtime import Runtime

Echo = Callable[[str], None]


class LoopHook:
    """Runs after the steps it is due at; ``before`` is told each step just before it is submitted."""

    def before(self, step: int) -> None:
        """Step ``step`` (1-based) is about to be submitted."""

    def due(self, step: int, final: bool) -> bool:
        """Whether to run after ``step``; ``final``: the loop's last step (its end, or a preemption)."""
        return final

    def __call__(self, step: int, record: dict[str, Any], final: bool) -> None:
        raise NotImplementedError

    def close(self, lost_hosts: bool) -> None:
        """The loop ended (``lost_hosts``: by a worker failure, whose hosts are gone)."""


class Every(LoopHook):
    """A function of (step, record) every ``every`` steps (``Trainer.add_hook``)."""

    def __init__(self, every: int, fn: Callable[[int, dict[str, Any]], None]):
        if every <= 0:
            raise ValueError(f"hook interval must be positive, got {every}")
        self.every, self.fn = every, fn

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, record: dict[str, Any], final: bool) -> None:
        self.fn(step, record)


class Evaluation(LoopHook):
    """``val_loss``: the params' mean cross-entropy on the same held-out batches every ``every`` steps
    and at the end."""

    def __init__(self, runtime: Runtime, batches: list[Batch], every: int):
        self.runtime, self.batches, self.every = runtime, batches, every

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def __call__(self, step: int, record: dict[str, Any], final: bool) -> None:
        record["val_loss"] = self.runtime.evaluate(self.batches)


class Logging(LoopHook):
    """Writes the record to every logger every ``every`` steps, at the end, and at every evaluation
    (every ``eval_every`` steps: a validation loss is always logged); ``show`` gets each record."""

    def __init__(self, loggers: list[Any], every: int, eval_every: int, show: Callable[[dict[str, Any]], None]):
        self.loggers, self.every, self.eval_every, self.show = loggers, every, eval_every, show

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final or bool(self.eval_every and step % self.eval_every == 0)

    def __call__(self, step: int, record: dict[str, Any], final: bool) -> None:
        for logger in self.loggers:
            logger.write(record)
        self.show(record)

    def close(self, lost_hosts: bool) -> None:
        for logger in self.loggers:
            logger.close()


class Checkpointing(LoopHook):
    """A checkpoint every ``every`` steps (0: only at the end), at the end and on preemption; the
    last one written synchronously."""

    def __init__(self, runtime: Runtime, every: int, meta: Callable[[int, dict[str, Any]], dict[str, Any]],
                 echo: Echo):
        self.runtime, self.every, self.meta, self.echo = runtime, every, meta, echo

    def due(self, step: int, final: bool) -> bool:
        return bool(self.every and step % self.every == 0) or final

    def __call__(self, step: int, record: dict[str, Any], final: bool) -> None:
        if not self.runtime.save(self.meta(step, record), wait=final):
            self.echo(f"fax: step {step} already has a complete checkpoint (written before the run was restarted "
                      "from an earlier step; an exact resume reaches the same state): kept it")


class Profiling(LoopHook):
    """The JAX profiler over the steps of ``window`` (1-based), on every process of the runtime: on
    just before the first of them is submitted, off after the last, or when the loop ends first."""

    def __init__(self, runtime: Runtime, window: range, echo: Echo):
        self.runtime, self.window, self.echo = runtime, window, echo
        self.first: int | None = None  # while tracing: the first traced step
        self.step = 0  # the last step submitted

    def before(self, step: int) -> None:
        if self.first is None and step in self.window:
            self.runtime.start_profile()
            self.first = step
        self.step = step

    def due(self, step: int, final: bool) -> bool:
        return self.first is not None and (step == self.window[-1] or final)

    def __call__(self, step: int, record: dict[str, Any], final: bool) -> None:
        where = self.runtime.stop_profile()
        steps = f"step {self.step}" if self.first == self.step else f"steps {self.first}-{self.step}"
        self.echo(f"fax: profiled {steps} -> {where}; open it with tensorboard --logdir, or a "
                  "perfetto_trace.json.gz at ui.perfetto.dev")
        self.first = None

    def close(self, lost_hosts: bool) -> None:
        if self.first is not None and not lost_hosts:  # lost hosts write nothing
            self(self.step, {}, True)


class TensorBoardLog:
    """Scalars as TensorBoard event files in ``folder`` (tensorboardX: no TensorFlow or torch needed)."""

    def __init__(self, folder: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("logging.tensorboard=true needs tensorboardX: pip install -e '.[logging]'") from None
        self.writer = SummaryWriter(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """Scalars to a Weights & Biases run. The run's id is kept in the run directory, so a resumed
    run goes on logging to the same W&B run; ``WANDB_MODE=offline`` writes it locally."""

    def __init__(self, config: Config):
        try:
            import wandb
        except ImportError:
            raise ImportError("logging.wandb_project needs wandb: pip install -e '.[logging]'") from None
        log, run_dir = config.logging, Path(config.run_dir)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=log.wandb_project, entity=log.wandb_entity or None,
                              name=log.wandb_name or run_dir.absolute().name, id=run_id, resume="allow",
                              dir=str(run_dir), config=json.loads(json.dumps(config.to_dict())))

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def loggers(config: Config, kept: Iterable[dict[str, Any]]) -> list[Any]:
    """The logging backends ``config.logging`` asks for, after RUN_DIR/metrics.jsonl (rewritten with
    the ``kept`` records: a resumed run drops what it logged past its checkpoint)."""
    run_dir = Path(config.run_dir)
    out: list[Any] = [MetricsLog(run_dir / "metrics.jsonl", keep=list(kept))]
    if config.logging.tensorboard:
        out.append(TensorBoardLog(run_dir / "tensorboard"))
    if config.logging.wandb_project:
        out.append(WandbLog(config))
    return out
