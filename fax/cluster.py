"""Ray runtime: one ``HostWorker`` actor per host, one multi-controller JAX job over one global mesh.

The head (the Trainer's process) reserves one bundle per host in a placement group (a whole
TPU host, all GPUs of a node, or one emulated CPU host), starts a fresh actor process in each,
brings up ``jax.distributed`` with worker 0 as the coordinator, and then drives the same calls a
local ``HostRuntime`` takes: for each step it sends every host exactly its rows of the global
batch. A worker that dies or hangs raises ``WorkerFailure``; the Trainer then calls
``restart()`` and ``start()`` again, which brings up fresh actors from the latest checkpoint.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fax.config import Config, ConfigError, config_from_dict
from fax.runtime import HostRuntime, RowRanges, WorkerFailure, take_rows

HOST_RESOURCE = "fax_host"  # one unit per emulated CPU host (`ray start --resources='{"fax_host": 1}'`)
IN_FLIGHT_STEPS = 2  # the step running on the hosts and the next one, whose batch is already there
EVAL_BATCHES_PER_CALL = 4  # an evaluation's batches go to the hosts in groups, two groups in flight
SOCKET_PATH_ROOM = 40  # Ray's socket paths under its temp dir must stay below the 107-byte Unix limit


class ClusterError(RuntimeError):
    """The hosts could not be brought up (not enough resources, a worker that never joined)."""


class HostWorker:
    """One host's JAX process. Built in a fresh actor process: ``jax.distributed`` starts once per process."""

    def __init__(self, cpu_devices: int):
        if cpu_devices:  # must precede the first use of the CPU backend
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        self.runtime: HostRuntime | None = None
        self.engine: Any = None  # a serving Engine, when the workers serve instead of train
        self.rows_seen: np.ndarray | None = None

    def where(self) -> dict[str, Any]:
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "hostname": socket.gethostname()}

    def free_port(self, ip: str) -> int:
        with socket.socket() as s:
            s.bind((ip, 0))
            return s.getsockname()[1]

    def initialize(self, coordinator: str, num_processes: int, process_id: int, timeout_s: int,
                   heartbeat_s: int) -> dict[str, Any]:
        """Join the multi-process JAX job. A job of one process stays single-process: on CPU,
        jax.distributed would route even its in-process collectives through gloo over TCP."""
        if num_processes > 1:
            jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                                       heartbeat_timeout_seconds=heartbeat_s, coordinator_bind_address=coordinator)
        return {"process_index": jax.process_index(), "devices": jax.device_count(),
                "local_devices": jax.local_device_count()}

    def build(self, config: dict[str, Any], resume_step: int | None) -> dict[str, Any]:
        self.runtime = HostRuntime(config_from_dict(config))
        seconds = self.runtime.start(resume_step)
        return {"rows": self.runtime.rows, "seconds": seconds, **self.runtime.describe()}

    def load_params(self, config: dict[str, Any], step: int | None) -> dict[str, Any]:
        """This host's shards of a checkpoint's params, to evaluate them (no optimizer state, no train step)."""
        self.runtime = HostRuntime(config_from_dict(config))
        return {"rows": self.runtime.rows, "step": self.runtime.load_params(step), **self.runtime.describe()}

    def step(self, rows: np.ndarray) -> dict[str, float]:
        self.rows_seen = rows
        return HostRuntime.metrics(self.runtime.step_rows(rows))

    def evaluate(self, local_batches: list[np.ndarray]) -> np.ndarray:
        return self.runtime.evaluate_rows(local_batches)

    def last_rows(self) -> np.ndarray | None:
        return self.rows_seen

    def save(self, meta: dict[str, Any], wait: bool) -> None:
        self.runtime.save(meta, wait)

    def wait(self) -> None:
        if self.runtime is not None:  # a serving worker has no checkpoint writes
            self.runtime.wait()

    def generate(self, prompt: list[int], new_tokens: int, temperature: float, vocab_limit: int) -> list[int]:
        return self.runtime.generate(prompt, new_tokens, temperature, vocab_limit)

    def start_profile(self) -> None:
        self.runtime.start_profile()

    def stop_profile(self) -> str:
        return self.runtime.stop_profile()

    def load_engine(self, run_dir: str, step: int | None, max_batch: int) -> dict[str, Any]:
        """This host's share of a serving engine over the global mesh (params restored onto it)."""
        from fax.serve import Engine

        self.engine = Engine.from_run_dir(run_dir, step=step, max_batch=max_batch)
        e = self.engine
        return {"step": e.step, "cfg": e.cfg, "end_ids": e.end_ids, "batch_buckets": e.batch_buckets,
                "tensor": e.mesh.shape["tensor"]}

    def engine_call(self, method: str, *args: Any) -> Any:
        return getattr(self.engine, method)(*args)


@dataclass(frozen=True)
class HostLayout:
    """What each host contributes and what its actor asks of the scheduler."""

    kind: str  # "tpu", "gpu", "cpu" (one emulated host per `fax_host` unit) or "node" (plain CPU nodes)
    hosts: int
    devices_per_host: int
    bundle: dict[str, float]
    strategy: str  # placement group strategy: accelerator hosts are distinct nodes
    first_host: dict[str, float] = field(default_factory=dict)  # extra asks of worker 0 (a TPU slice's head)

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [{**self.bundle, **(self.first_host if i == 0 else {})} for i in range(self.hosts)]


def host_layout(cluster_resources: dict[str, float], nodes: list[dict[str, Any]], hosts: int,
                devices_per_host: int) -> HostLayout:
    """One host per TPU VM, per GPU node, per ``fax_host`` unit, or else per CPU node."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    for kind, resource in (("tpu", "TPU"), ("gpu", "GPU")):
        counts = [int(r[resource]) for r in alive if r.get(resource)]
        if counts:
            # A TPU slice's worker 0 offers `TPU-<type>-head`: our worker 0 (the coordinator) goes there.
            heads = sorted(k for k in cluster_resources if k.startswith("TPU-") and k.endswith("-head"))
            first = {heads[0]: 1} if kind == "tpu" and heads else {}
            return HostLayout(kind, hosts or len(counts), min(counts), {resource: min(counts)}, "STRICT_SPREAD", first)
    if cluster_resources.get(HOST_RESOURCE):
        return HostLayout("cpu", hosts or int(cluster_resources[HOST_RESOURCE]), devices_per_host,
                          {HOST_RESOURCE: 1}, "PACK")
    return HostLayout("node", hosts or len(alive), devices_per_host, {"CPU": 1}, "STRICT_SPREAD")


def ray_temp_dir(config: Config) -> str:
    """Where a local cluster keeps its files: the run directory, unless that path is too long for sockets."""
    wanted = Path(config.cluster.ray_temp_dir or Path(config.run_dir) / "ray").absolute()
    if len(str(wanted)) <= SOCKET_PATH_ROOM:
        wanted.mkdir(parents=True, exist_ok=True)
        return str(wanted)
    return tempfile.mkdtemp(prefix="fax-ray-")


def start_ray(**init_args: Any) -> None:
    """``ray.init``, keeping this process's SIGTERM handler: Ray's driver installs a crash handler
    for SIGTERM that ends the process at once, skipping the cleanup that `fax` commands and the
    trainer's save-on-SIGTERM run (Ray's own shutdown among it)."""
    previous = signal.getsignal(signal.SIGTERM)
    ray.init(**init_args)
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def connect(config: Config, echo: Callable[[str], None]) -> bool:
    """Join ``cluster.address`` or start a local cluster (with emulated hosts if asked); True if
    this process started Ray and so shuts it down."""
    c = config.cluster
    if ray.is_initialized():
        return False
    if c.address:
        start_ray(address=c.address, log_to_driver=True)
        return True
    temp = ray_temp_dir(config)
    resources = {HOST_RESOURCE: c.emulate_hosts} if c.emulate_hosts else None
    start_ray(resources=resources, _temp_dir=temp, include_dashboard=False, log_to_driver=True)
    echo(f"fax: started a local Ray cluster (files under {temp})")
    return True


def actor_options(layout: HostLayout, bundle: dict[str, float]) -> dict[str, Any]:
    """How an actor asks for one host's bundle; on CPU hosts it sees only the (emulated) CPU devices."""
    env = {"JAX_PLATFORMS": "cpu"} if layout.kind in ("cpu", "node") else {}
    return {"num_cpus": 1 if layout.kind == "node" else 0, "num_gpus": bundle.get("GPU", 0),
            "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            "runtime_env": {"env_vars": env}}


def _free_hosts() -> dict[str, float]:
    """The free resources a host bundle can ask for (Ray's own bookkeeping entries left out)."""
    return {k: v for k, v in sorted(ray.available_resources().items()) if k in ("CPU", "GPU", "TPU", HOST_RESOURCE)}


def _short(error: BaseException) -> str:
    """The first sentence of Ray's (long) explanation."""
    for line in str(error).splitlines():
        if line.strip() and not line.startswith(("\t", " ")) and ":" not in line[:20]:
            return line.strip().split(". ")[0][:200]
    return type(error).__name__


class RayRuntime:
    """The head's side of a Ray-mode run: the same methods as ``HostRuntime``, carried out on every host."""

    def __init__(self, config: Config, echo: Callable[[str], None] = print):
        c = config.cluster
        if c.emulate_hosts and c.address:
            raise ConfigError(f"cluster.emulate_hosts={c.emulate_hosts} starts a local cluster; it cannot join "
                              f"cluster.address={c.address!r}. Drop one of them")
        for name in ("hosts", "emulate_hosts", "max_restarts"):
            if getattr(c, name) < 0:
                raise ConfigError(f"cluster.{name} must be >= 0, got {getattr(c, name)}")
        for name in ("devices_per_host", "startup_timeout_s", "step_timeout_s", "heartbeat_timeout_s"):
            if getattr(c, name) <= 0:
                raise ConfigError(f"cluster.{name} must be positive, got {getattr(c, name)}")
        self.config, self.echo = config, echo
        self.owns_ray = connect(config, echo)
        self.layout = host_layout(ray.cluster_resources(), ray.nodes(), c.hosts or c.emulate_hosts,
                                  c.devices_per_host)
        self.device_count = self.layout.devices
        self.workers: list[Any] = []
        self.group: Any = None
        self.places: list[dict[str, Any]] = []
        self.built: list[dict[str, Any]] = []
        self.pending: deque[list[ray.ObjectRef]] = deque()

    # Bring-up.

    def bring_up(self) -> None:
        """Place one actor per host and join them into one JAX job (once; ``restart`` undoes it)."""
        if self.workers:
            return
        try:
            self._bring_up()
        except BaseException:
            self.restart()  # release the placement group and whatever actors did start
            raise

    def _bring_up(self) -> None:
        c, layout = self.config.cluster, self.layout
        self.group = placement_group(layout.bundles, strategy=layout.strategy)
        ready, _ = ray.wait([self.group.ready()], timeout=c.startup_timeout_s)
        if not ready:
            raise ClusterError(
                f"could not place {layout.hosts} host workers of {layout.bundle} each within "
                f"cluster.startup_timeout_s={c.startup_timeout_s:.0f}s; free now: {_free_hosts()}. "
                "Start more hosts or lower cluster.hosts")
        emulated = layout.devices_per_host if layout.kind in ("cpu", "node") else 0
        cls = ray.remote(HostWorker)
        self.workers = [
            cls.options(**actor_options(layout, bundle),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, i)).remote(emulated)
            for i, bundle in enumerate(layout.bundles)]
        self.places = self._gather([w.where.remote() for w in self.workers], c.startup_timeout_s,
                                   "starting the host workers", bring_up=True)
        ips = {p["ip"] for p in self.places}
        ip = "127.0.0.1" if ips == {ray.util.get_node_ip_address()} else self.places[0]["ip"]
        port = self._gather([self.workers[0].free_port.remote(ip)], c.startup_timeout_s, "picking a port",
                            bring_up=True)[0]
        coordinator = f"{ip}:{port}"
        joined = self._gather(
            [w.initialize.remote(coordinator, layout.hosts, i, int(c.startup_timeout_s), c.heartbeat_timeout_s)
             for i, w in enumerate(self.workers)], c.startup_timeout_s + 30,
            f"jax.distributed bring-up (coordinator {coordinator})", bring_up=True)
        counts = {j["devices"] for j in joined}
        if counts != {layout.devices} or [j["process_index"] for j in joined] != list(range(layout.hosts)):
            raise ClusterError(f"the hosts disagree on the job: expected {layout.devices} devices and process "
                               f"indices 0..{layout.hosts - 1}, got {joined}")
        self.echo(f"fax: {layout.hosts} host workers joined ({layout.devices} {layout.kind} devices, "
                  f"coordinator {coordinator}): " + ", ".join(f"{p['hostname']} pid {p['pid']}" for p in self.places))

    def _gather(self, refs: list[ray.ObjectRef], timeout: float, what: str, bring_up: bool = False) -> list[Any]:
        """The result of one call on every worker. A dead or silent worker raises WorkerFailure
        (ClusterError during bring-up) naming it; an exception in worker code is raised as it is."""
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending, deadline = list(refs), time.monotonic() + timeout
        failure = ClusterError if bring_up else WorkerFailure
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                silent = sorted(index[r] for r in pending)
                raise failure(f"{what}: host worker(s) {silent} did not answer within {timeout:.0f}s")
            i = index[ready[0]]
            try:
                results[i] = ray.get(ready[0])
            except RayActorError as e:  # ready, so ray.get cannot time out
                raise failure(f"{what}: host worker {i} died ({_short(e)})") from e
        return results

    # The HostRuntime interface.

    def start(self, resume_step: int | None) -> float:
        self._build("build", "building the model and compiling the step", resume_step)
        return max(b["seconds"] for b in self.built)

    def load_params(self, step: int | None) -> int:
        self._build("load_params", "restoring the params", step)
        return self.built[0]["step"]

    def _build(self, method: str, what: str, step: int | None) -> None:
        """Every host builds its runtime from the config (``method``: the HostWorker's) at ``step``."""
        self.bring_up()
        config = self.config.to_dict()
        self.built = self._gather([getattr(w, method).remote(config, step) for w in self.workers],
                                  self.config.cluster.step_timeout_s, what)

    @property
    def rows(self) -> list[RowRanges]:
        """Each host's row ranges of the global batch, as its batch sharding assigns them."""
        return [[tuple(r) for r in b["rows"]] for b in self.built]

    def submit(self, batch: np.ndarray) -> list[ray.ObjectRef]:
        while len(self.pending) >= IN_FLIGHT_STEPS:
            self.metrics(self.pending[0])
        handle = [w.step.remote(ray.put(take_rows(batch, rows))) for w, rows in zip(self.workers, self.rows)]
        self.pending.append(handle)
        return handle

    def metrics(self, handle: list[ray.ObjectRef]) -> dict[str, float]:
        values = self._gather(handle, self.config.cluster.step_timeout_s, "a train step")
        if any(h is handle for h in self.pending):
            while self.pending.popleft() is not handle:
                pass  # earlier steps finished before this one: each actor runs its calls in order
        return values[0]  # replicated: every host computed the same scalars

    def _on_all(self, what: str, method: str, *args: Any) -> list[Any]:
        while self.pending:
            self.metrics(self.pending[0])
        return self._gather([getattr(w, method).remote(*args) for w in self.workers],
                            self.config.cluster.step_timeout_s, what)

    def evaluate(self, batches: Iterable[np.ndarray]) -> float:
        """As ``HostRuntime.evaluate``; the batches go out a few at a time, the next group sent while
        the hosts evaluate one, so the head never holds more than two groups."""
        while self.pending:
            self.metrics(self.pending[0])

        def gathered(calls: list[ray.ObjectRef]) -> np.ndarray:
            return self._gather(calls, self.config.cluster.step_timeout_s, "an evaluation")[0]  # replicated

        batches, in_flight, losses = iter(batches), deque(), []
        while group := list(itertools.islice(batches, EVAL_BATCHES_PER_CALL)):
            in_flight.append([w.evaluate.remote([take_rows(b, rows) for b in group])
                              for w, rows in zip(self.workers, self.rows)])
            if len(in_flight) == 2:
                losses.append(gathered(in_flight.popleft()))
        losses += [gathered(calls) for calls in in_flight]
        return float(np.mean(np.concatenate(losses)))

    def save(self, meta: dict[str, Any], wait: bool) -> None:
        self._on_all(f"saving the checkpoint of step {meta['step']}", "save", meta, wait)

    def wait(self) -> None:
        self._on_all("finishing checkpoint writes", "wait")

    def generate(self, prompt: list[int], new_tokens: int, temperature: float, vocab_limit: int) -> list[int]:
        return self._on_all("sampling", "generate", prompt, new_tokens, temperature, vocab_limit)[0]

    def start_profile(self) -> None:
        self._on_all("starting the profiler", "start_profile")

    def stop_profile(self) -> str:
        folders = self._on_all("writing the profiles", "stop_profile")
        return f"{Path(folders[0]).parent} (host0..host{len(folders) - 1}, each on its host's disk)"

    def describe(self) -> dict[str, Any]:
        return self.built[0]

    def worker_pids(self) -> list[int]:
        return [p["pid"] for p in self.places]

    def restart(self) -> None:
        """Tear the whole group down; the next ``start`` brings up fresh actors."""
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)
        self.workers, self.group, self.built, self.pending = [], None, [], deque()

    def close(self) -> None:
        try:
            if self.workers:
                self.wait()
        finally:
            self.restart()
            if self.owns_ray:
                ray.shutdown()


class ClusterEngine:
    """A serving engine whose processes are the host workers (one global mesh, for models that need
    more than one host): the engine calls a ``Batcher`` makes, made on every host; the tokens are
    replicated, so worker 0's answer is everyone's."""

    def __init__(self, runtime: RayRuntime, run_dir: str, step: int | None, max_batch: int):
        self.runtime = runtime
        runtime.bring_up()
        loaded = runtime._gather([w.load_engine.remote(run_dir, step, max_batch) for w in runtime.workers],
                                 runtime.config.cluster.step_timeout_s, "restoring the params onto the hosts")[0]
        self.step, self.cfg, self.end_ids = loaded["step"], loaded["cfg"], loaded["end_ids"]
        self.batch_buckets = loaded["batch_buckets"]  # what the Batcher reads of an engine, as the hosts built it
        runtime.echo(f"fax: serving step {self.step} on {runtime.layout.hosts} hosts "
                     f"(tensor parallel over {loaded['tensor']} devices)")

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def _call(self, method: str, *args: Any) -> Any:
        return self.runtime._on_all(f"engine {method}", "engine_call", method, *args)[0]

    def reset(self) -> None:
        self._call("reset")

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], sampling: Sequence[Any]) -> np.ndarray:
        return self._call("prefill", list(rows), [list(p) for p in prompts], list(sampling))

    def decode(self, tokens: np.ndarray, positions: np.ndarray, steps: np.ndarray, sampling: Sequence[Any]) -> np.ndarray:
        return self._call("decode", tokens, positions, steps, list(sampling))

    def score(self, tokens: Sequence[int]) -> tuple[np.ndarray, ...]:
        return self._call("score", list(tokens))

    def warm_up(self) -> None:
        """``Engine.warm_up`` on every host (within cluster.step_timeout_s, as any engine call)."""
        self._call("warm_up")

    def close(self) -> None:
        self.runtime.close()
