"""Ray mode for training: the head drives a ``HostRuntime`` on every host of a ``HostGroup``.

For each step the head sends every host exactly its rows of the global batch (``ray.put`` once per
host), and keeps the next step's batch in flight while one runs. A worker that dies or hangs
raises ``WorkerFailure``; the Trainer then calls ``restart()`` and ``start()`` again, which brings
up fresh actors from the latest checkpoint.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray

from fax.cluster.hosts import HostGroup
from fax.config import Config, config_from_dict
from fax.data import Batch
from fax.train.runtime import HostRuntime, RowRanges, take_rows

IN_FLIGHT_STEPS = 2  # the step running on the hosts and the next one, whose batch is already there
EVAL_BATCHES_PER_CALL = 4  # an evaluation's batches go to the hosts in groups, two groups in flight


def train_host(config: dict[str, Any], resume_step: int | None) -> tuple[HostRuntime, dict[str, Any]]:
    """A host's runtime, its state fresh or restored and its step compiled (``HostWorker.load``)."""
    runtime = HostRuntime(config_from_dict(config))
    seconds = runtime.start(resume_step)
    return runtime, {"rows": runtime.rows, "seconds": seconds, **runtime.describe()}


def eval_host(config: dict[str, Any], step: int | None) -> tuple[HostRuntime, dict[str, Any]]:
    """A host's shards of a checkpoint's params, to evaluate them (no optimizer state, no train step)."""
    runtime = HostRuntime(config_from_dict(config))
    return runtime, {"rows": runtime.rows, "step": runtime.load_params(step), **runtime.describe()}


class RayRuntime:
    """The head's side of a Ray-mode run: the ``Runtime`` interface, carried out on every host."""

    def __init__(self, config: Config, echo: Callable[[str], None] = print):
        self.config = config
        self.group = HostGroup(config, echo)
        self.device_count = self.group.device_count
        self.built: list[dict[str, Any]] = []
        self.pending: deque[list[ray.ObjectRef]] = deque()

    def start(self, resume_step: int | None) -> float:
        self._build(train_host, "building the model and compiling the step", resume_step)
        return max(b["seconds"] for b in self.built)

    def load_params(self, step: int | None) -> int:
        self._build(eval_host, "restoring the params", step)
        return self.built[0]["step"]

    def _build(self, factory: Callable, what: str, step: int | None) -> None:
        """Every host builds its runtime from the config at ``step``."""
        self.built = self.group.load(what, factory, self.config.to_dict(), step)

    @property
    def rows(self) -> list[RowRanges]:
        """Each host's row ranges of the global batch, as its batch sharding assigns them."""
        return [[tuple(r) for r in b["rows"]] for b in self.built]

    def submit(self, batch: Batch) -> list[ray.ObjectRef]:
        while len(self.pending) >= IN_FLIGHT_STEPS:
            self.metrics(self.pending[0])
        handle = [w.call.remote("step_values", ray.put(take_rows(batch, rows)))
                  for w, rows in zip(self.group.workers, self.rows)]
        self.pending.append(handle)
        return handle

    def metrics(self, handle: list[ray.ObjectRef]) -> dict[str, float]:
        values = self.group.gather(handle, self.group.timeout_s, "a train step")
        if any(h is handle for h in self.pending):
            while self.pending.popleft() is not handle:
                pass  # earlier steps finished before this one: each actor runs its calls in order
        return values[0]  # replicated: every host computed the same scalars

    def _on_all(self, what: str, method: str, *args: Any) -> list[Any]:
        """``method`` on every host's runtime once the steps in flight are done."""
        while self.pending:
            self.metrics(self.pending[0])
        return self.group.call_all(what, method, *args)

    def evaluate(self, batches: Iterable[Batch]) -> float:
        """As ``HostRuntime.evaluate``; the batches go out a few at a time, the next group sent while
        the hosts evaluate one, so the head never holds more than two groups."""
        while self.pending:
            self.metrics(self.pending[0])

        def gathered(calls: list[ray.ObjectRef]) -> Any:
            return self.group.gather(calls, self.group.timeout_s, "an evaluation")[0]  # replicated

        batches, in_flight, losses = iter(batches), deque(), []
        while group := list(itertools.islice(batches, EVAL_BATCHES_PER_CALL)):
            in_flight.append([w.call.remote("evaluate_rows", [take_rows(b, rows) for b in group])
                              for w, rows in zip(self.group.workers, self.rows)])
            if len(in_flight) == 2:
                losses.extend(gathered(in_flight.popleft()))
        for calls in in_flight:
            losses.extend(gathered(calls))
        return float(sum(losses) / len(losses))

    def save(self, meta: dict[str, Any], wait: bool) -> bool:
        return all(self._on_all(f"saving the checkpoint of step {meta['step']}", "save", meta, wait))

    def wait(self) -> None:
        self._on_all("finishing checkpoint writes", "wait")

    def start_profile(self) -> None:
        self._on_all("starting the profiler", "start_profile")

    def stop_profile(self) -> str:
        folders = self._on_all("writing the profiles", "stop_profile")
        return f"{Path(folders[0]).parent} (host0..host{len(folders) - 1}, each on its host's disk)"

    def describe(self) -> dict[str, Any]:
        return self.built[0]

    def worker_pids(self) -> list[int]:
        return self.group.worker_pids()

    def restart(self) -> None:
        """Tear the whole group down; the next ``start`` brings up fresh actors."""
        self.group.restart()
        self.built, self.pending = [], deque()

    def close(self) -> None:
        try:
            if self.built and self.group.factory in (train_host, eval_host):  # (the hosts may serve the model now)
                self.wait()
        finally:
            self.built, self.pending = [], deque()
            self.group.close()
