"""One JAX process's share of a run: its mesh, sharded state, compiled step and checkpoint writer.

In local mode the Trainer drives one ``HostRuntime`` in its own process; in Ray mode every host
worker holds one and the head drives them all with the same calls (``fax.train.ray_runtime``).
Either way the head hands over the *global* batch of a step, or just this process's rows of it.
Both offer the head-side interface, ``Runtime``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from fax.checkpoint import Checkpointer, checkpoint_dir
from fax.config import Config, ConfigError
from fax.data import Batch
from fax.interop.hf import import_params, init_from_dir
from fax.interop.sources import source_params
from fax.parallel import make_mesh
from fax.train import step as step_lib

RowRanges = list[tuple[int, int]]


class Runtime(Protocol):
    """What the Trainer's loop drives: the processes of a run, local (``HostRuntime``) or on many hosts."""

    def start(self, resume_step: int | None) -> float: ...  # state fresh or restored, step compiled; seconds

    def load_params(self, step: int | None) -> int: ...  # a checkpoint's params alone, to evaluate; its step

    def submit(self, batch: Batch) -> Any: ...  # one step on the global batch; a handle, before it finishes

    def metrics(self, handle: Any) -> dict[str, float]: ...  # a submitted step's values (waits for it)

    def evaluate(self, batches: Iterable[Batch]) -> float: ...  # mean cross-entropy of the current params

    def save(self, meta: dict[str, Any], wait: bool) -> bool: ...  # False: the step's checkpoint was there

    def wait(self) -> None: ...  # pending checkpoint writes finished

    def start_profile(self) -> None: ...

    def stop_profile(self) -> str: ...  # where the traces went

    def describe(self) -> dict[str, Any]: ...  # devices, device kind, platform, process count

    def restart(self) -> None: ...  # after a WorkerFailure: the next start() brings up fresh processes

    def close(self) -> None: ...


def host_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> RowRanges:
    """The sorted, merged ``[start, stop)`` row ranges of a global array this process's devices hold."""
    spans = sorted({(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map(shape).values()})
    merged: RowRanges = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def take_rows(batch: Batch, rows: RowRanges) -> Batch:
    """A host's slice of the global batch: its row ranges of every field, concatenated in order."""
    return jax.tree.map(lambda x: np.concatenate([x[start:stop] for start, stop in rows]), batch)


def global_batch(local: Batch, rows: RowRanges, sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> Batch:
    """The global batch whose rows ``rows`` are ``local`` (this process's part), placed per device."""
    return jax.tree.map(lambda x: global_array(x, rows, sharding, shape), local)


def global_array(local: np.ndarray, rows: RowRanges, sharding: jax.sharding.Sharding,
                 shape: tuple[int, ...]) -> jax.Array:
    """The global array whose rows ``rows`` are ``local`` (this process's part), placed per device."""
    offset, position = {}, 0
    for start, stop in rows:
        offset[start] = position
        position += stop - start
    if position != local.shape[0]:
        raise ValueError(f"this host holds {position} rows of the batch but was given {local.shape[0]}")

    def local_rows(index: tuple[slice, ...]) -> np.ndarray:
        start = index[0].start or 0
        block = next(b for b in rows if b[0] <= start < b[1])
        begin = offset[block[0]] + start - block[0]
        stop = shape[0] if index[0].stop is None else index[0].stop
        return local[(slice(begin, begin + stop - start), *index[1:])]

    per_device = [jax.device_put(local_rows(index), device)
                  for device, index in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, per_device)


def run_mesh(config: Config, devices: list[jax.Device]) -> Mesh:
    """The run's mesh over ``devices``; what keeps them from forming it (TPU slices without
    parallel.dcn_*) is a ConfigError naming the setting."""
    try:
        return make_mesh(config.parallel, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def profile_dir(run_dir: str | Path) -> Path:
    """Where this process writes its profiler traces: a folder per host (hosts of one machine share
    a host name, which names the trace files)."""
    return Path(run_dir) / "profile" / f"host{jax.process_index()}"


class HostRuntime:
    """Builds everything one process needs from the config; every process of a run builds the same."""

    def __init__(self, config: Config, devices: list[jax.Device] | None = None):
        self.config = config
        self.devices = list(jax.devices() if devices is None else devices)
        self.training = step_lib.build(config, run_mesh(config, self.devices))
        self.batch_shape = (config.train.batch_size, config.seq_len + 1)
        self.rows = host_rows(self.training.batch_sharding, self.batch_shape)
        self._checkpointer: Checkpointer | None = None
        self.state: step_lib.State | None = None
        self.compiled: Any = None
        self.next_step = 1  # the number of the step the next call runs (1-based, as logged)
        self.trained_rows: Batch | None = None  # what ``step_values`` last trained on

    @property
    def checkpointer(self) -> Checkpointer:
        """The run's checkpoints, opened when first saved or restored: evaluating a Hugging Face folder
        (``run_dir`` hf:DIR) opens none, and creates no folder named after it."""
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(checkpoint_dir(self.config.run_dir, self.config.checkpoint),
                                              self.config.checkpoint)
        return self._checkpointer

    def start(self, resume_step: int | None) -> float:
        """A fresh state, or the checkpoint of ``resume_step`` placed on this mesh; then compile.
        Returns the seconds it took."""
        started = time.perf_counter()
        training = self.training
        if resume_step is None:
            self.state = training.init()
            if self.config.init_from:  # the optimizer state starts empty either way
                lora, shardings = self.config.lora.rank, training.state_shardings["params"]
                base = import_params(init_from_dir(self.config.init_from), self.config.model,
                                     shardings["base"] if lora else shardings)
                self.state["params"] = {**self.state["params"], "base": base} if lora else base
        else:
            target = jax.eval_shape(training.init)
            self.state, _ = self.checkpointer.restore(resume_step, target, training.state_shardings)
        self.compiled = step_lib.compile_step(training, self.state, self.batch_shape)
        self.next_step = (resume_step or 0) + 1
        return time.perf_counter() - started

    def load_params(self, step: int | None) -> int:
        """The params alone of checkpoint ``step`` (default: the latest complete one) placed on this
        mesh, to evaluate them: no optimizer state read, no train step compiled. Returns the step."""
        params, step = source_params(self.config, self.training.mesh, step, merged=False)
        self.state = {"params": params}
        return step

    def step_rows(self, local: Batch) -> dict[str, jax.Array]:
        """Run one step on this process's rows of the global batch; returns before it finishes."""
        batch = global_batch(local, self.rows, self.training.batch_sharding, self.batch_shape)
        with jax.profiler.StepTraceAnnotation("train", step_num=self.next_step):  # a profile's step markers
            self.state, metrics = self.compiled(self.state, batch)
        self.next_step += 1
        return metrics

    def step_values(self, local: Batch) -> dict[str, float]:
        """``step_rows``, waiting for its values (a Ray host's step); the rows are kept for inspection."""
        self.trained_rows = local
        return self.metrics(self.step_rows(local))

    def last_rows(self) -> Batch | None:
        """This process's rows of the last step ``step_values`` ran (what a Ray host was sent)."""
        return self.trained_rows

    def evaluate_rows(self, local_batches: Iterable[Batch]) -> np.ndarray:
        """Each batch's mean cross-entropy under the current params, given this process's rows of each."""
        losses = [self.training.evaluate(self.state["params"],
                                         global_batch(local, self.rows, self.training.batch_sharding, self.batch_shape))
                  for local in local_batches]
        return np.asarray(jax.device_get(losses), np.float32)

    # The head-side interface (``Runtime``).

    def submit(self, batch: Batch) -> dict[str, jax.Array]:
        return self.step_rows(take_rows(batch, self.rows))

    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Mean cross-entropy of the current params (after the last submitted step, or loaded) over ``batches``."""
        return float(np.mean(self.evaluate_rows(take_rows(b, self.rows) for b in batches)))

    @staticmethod
    def metrics(handle: dict[str, jax.Array]) -> dict[str, float | list[float]]:
        """The values of a submitted step (waits for it); a vector (each expert's load) as a list."""
        return {k: v.tolist() if v.ndim else float(v) for k, v in jax.device_get(handle).items()}

    def save(self, meta: dict[str, Any], wait: bool) -> bool:
        return self.checkpointer.save(self.state, meta, wait=wait)

    def wait(self) -> None:
        self.checkpointer.wait()

    def start_profile(self) -> None:
        """Trace this process from the next step on (the steps in flight finish first)."""
        jax.block_until_ready(self.state)
        jax.profiler.start_trace(str(profile_dir(self.config.run_dir)), create_perfetto_trace=True)

    def stop_profile(self) -> str:
        """Stop tracing once the submitted steps have finished; the folder the trace went to."""
        try:
            jax.block_until_ready(self.state)
        finally:
            jax.profiler.stop_trace()
        return str(profile_dir(self.config.run_dir))

    def describe(self) -> dict[str, Any]:
        """The devices of the run as this process sees them (what the head logs and checkpoints record)."""
        return {"devices": len(self.devices), "device_kind": self.devices[0].device_kind,
                "platform": self.devices[0].platform,
                "local_devices": sum(d.process_index == jax.process_index() for d in self.devices),
                "process_index": jax.process_index(), "process_count": jax.process_count()}

    def restart(self) -> None:
        raise RuntimeError("a local runtime has no workers to restart")  # WorkerFailure comes from Ray mode only

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
