"""Ray host groups: one ``HostWorker`` actor per host, joined into one multi-controller JAX job.

A ``HostGroup`` reserves one bundle per host in a placement group (a whole TPU host, all GPUs of a
node, or one emulated CPU host), starts a fresh actor process in each, and brings up
``jax.distributed`` with worker 0 as the coordinator. What each worker then holds is its caller's:
a training runtime (``fax.train.ray_runtime``) or a serving engine (``fax.serving.cluster_engine``),
built on the host by a factory and driven by method name. A worker that dies or hangs raises
``WorkerFailure``; ``restart()`` tears the group down and the next ``bring_up()`` starts fresh actors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ray
from ray._private import ray_constants
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fax.cluster import ClusterError, WorkerFailure
from fax.config import Config, ConfigError
from fax.interop.sources import hf_folder

HOST_RESOURCE = "fax_host"  # one unit per emulated CPU host (`ray start --resources='{"fax_host": 1}'`)
SOCKET_PATH_ROOM = 40  # Ray's socket paths under its temp dir must stay below the 107-byte Unix limit
RAY_FOLDER = "local"  # Ray's own temp dir, inside the private folder of a local cluster's files
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's nodes bind 127.0.0.1 (as on a laptop)
# (the host's payload, what it reports) of a factory's arguments: what a worker holds and drives
Factory = Callable[..., tuple[Any, Any]]


class HostWorker:
    """One host's JAX process. Built in a fresh actor process: ``jax.distributed`` starts once per process."""

    def __init__(self, cpu_devices: int):
        if cpu_devices:  # must precede the first use of the CPU backend
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        self.payload: Any = None  # what ``load`` built: a training runtime, a serving engine

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

    def load(self, factory: Factory, *args: Any) -> Any:
        """Build this host's payload with ``factory(*args)`` (replacing any earlier one); what it reports."""
        self.payload = None  # the old one's memory is free before the new one is built
        self.payload, report = factory(*args)
        return report

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.payload, method)(*args)


@dataclass(frozen=True)
class HostLayout:
    """What each host contributes and what its actor asks of the scheduler."""

    kind: str  # "tpu", "gpu", "cpu" (one emulated host per `fax_host` unit) or "node" (plain CPU nodes)
    hosts: int
    devices_per_host: int
    bundle: dict[str, float]
    strategy: str  # placement group strategy: accelerator hosts are distinct nodes
    # extra asks of each worker, in process order: a TPU slice (its name) and its worker 0 (the slice head)
    pins: tuple[dict[str, float], ...] = ()

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [{**self.bundle, **(self.pins[i] if i < len(self.pins) else {})} for i in range(self.hosts)]


SLICE_LABEL = "ray.io/tpu-slice-name"  # Ray's label of a TPU host's slice (its TPU name, also a resource of 1)


def tpu_slice_pins(nodes: list[dict[str, Any]], heads: list[str], hosts: int, slices: int) -> tuple[dict[str, float], ...]:
    """One TPU slice per group of hosts/slices workers, in process order: each worker asks for its
    slice's resource (the TPU name), the first of each slice also for the slice's head. ClusterError
    when the cluster has fewer whole slices."""
    per_slice = hosts // slices
    names: dict[str, int] = {}
    for n in nodes:
        name = (n.get("Labels") or {}).get(SLICE_LABEL)
        if n.get("Alive") and n["Resources"].get("TPU") and name:
            names[name] = names.get(name, 0) + 1
    whole = sorted(name for name, count in names.items() if count >= per_slice)
    if len(whole) < slices:
        raise ClusterError(f"parallel.dcn_* ask for {slices} TPU slices of {per_slice} hosts; the cluster has "
                           f"{len(whole)} ({', '.join(f'{k}: {v} hosts' for k, v in sorted(names.items())) or 'none'})")
    head = {heads[0]: 1.0} if heads else {}
    return tuple({name: 1.0, **(head if i == 0 else {})} for name in whole[:slices] for i in range(per_slice))


def host_layout(cluster_resources: dict[str, float], nodes: list[dict[str, Any]], hosts: int,
                devices_per_host: int, slices: int = 1) -> HostLayout:
    """One host per TPU VM, per GPU node, per ``fax_host`` unit, or else per CPU node; over many TPU
    slices, each slice's hosts consecutive workers (elsewhere a slice is consecutive hosts)."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    for kind, resource in (("tpu", "TPU"), ("gpu", "GPU")):
        counts = [int(r[resource]) for r in alive if r.get(resource)]
        if counts:
            # A TPU slice's worker 0 offers `TPU-<type>-head`: our worker 0 (the coordinator) goes there.
            heads = sorted(k for k in cluster_resources if k.startswith("TPU-") and k.endswith("-head"))
            hosts = hosts or len(counts)
            if kind == "tpu" and slices > 1:
                pins = tpu_slice_pins(nodes, heads, hosts, slices)
            else:
                pins = ({heads[0]: 1},) if kind == "tpu" and heads else ()
            return HostLayout(kind, hosts, min(counts), {resource: min(counts)}, "STRICT_SPREAD", pins)
    if cluster_resources.get(HOST_RESOURCE):
        return HostLayout("cpu", hosts or int(cluster_resources[HOST_RESOURCE]), devices_per_host,
                          {HOST_RESOURCE: 1}, "PACK")
    return HostLayout("node", hosts or len(alive), devices_per_host, {"CPU": 1}, "STRICT_SPREAD")


def ray_files(config: Config) -> str:
    """Where a local cluster keeps its files: ``cluster.ray_temp_dir``, else the run directory; a fresh
    /tmp folder when that path is too long for sockets, or when the run is a Hugging Face folder
    (``hf:DIR``, never written into)."""
    if config.cluster.ray_temp_dir:
        wanted = Path(config.cluster.ray_temp_dir).absolute()
    elif hf_folder(config.run_dir) is None:
        wanted = (Path(config.run_dir) / "ray").absolute()
    else:
        return tempfile.mkdtemp(prefix="fax-ray-")
    return str(wanted) if len(str(wanted / RAY_FOLDER)) <= SOCKET_PATH_ROOM else tempfile.mkdtemp(prefix="fax-ray-")


def start_ray(**init_args: Any) -> None:
    """``ray.init``, keeping this process's SIGTERM handler: Ray's driver installs a crash handler
    for SIGTERM that ends the process at once, skipping the cleanup that `fax` commands and the
    trainer's save-on-SIGTERM run (Ray's own shutdown among it)."""
    previous = signal.getsignal(signal.SIGTERM)
    ray.init(**init_args)
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def start_local_ray(folder: str, **init_args: Any) -> None:
    """A Ray cluster of this machine alone: its services listen on the loopback address only, its
    files are in ``folder`` (made private: Ray makes its own folders world-writable), and a watchdog
    ends its processes should this one be killed (``fax.cluster.watchdog``)."""
    os.environ[LOOPBACK_SWITCH] = "0"  # read by the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by ray.init (this process imported Ray already)
    Path(folder).mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ray_folder = str(Path(folder).absolute() / RAY_FOLDER)
    subprocess.Popen([sys.executable, "-m", "fax.cluster.watchdog", str(os.getpid()), ray_folder],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)  # before Ray starts: a kill during its start-up is covered too
    start_ray(_temp_dir=ray_folder, include_dashboard=False, **init_args)


def connect(config: Config, echo: Callable[[str], None]) -> bool:
    """Join ``cluster.address`` or start a local cluster (with emulated hosts if asked); True if
    this process started Ray and so shuts it down."""
    c = config.cluster
    if ray.is_initialized():
        return False
    if c.address:
        start_ray(address=c.address, log_to_driver=True)
        return True
    folder = ray_files(config)
    start_local_ray(folder, resources={HOST_RESOURCE: c.emulate_hosts} if c.emulate_hosts else None,
                    log_to_driver=True)
    echo(f"fax: started a local Ray cluster (files under {folder})")
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


class HostGroup:
    """The head's handle on one worker per host: bring-up, calls on every worker, tear-down."""

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
                                  c.devices_per_host, config.parallel.slices)
        if self.layout.hosts % config.parallel.slices:
            raise ConfigError(f"{self.layout.hosts} hosts do not split into the {config.parallel.slices} slices "
                              "parallel.dcn_stage x dcn_data x dcn_fsdp ask for; change cluster.hosts or parallel.dcn_*")
        self.workers: list[Any] = []
        self.group: Any = None
        self.places: list[dict[str, Any]] = []
        self.factory: Factory | None = None  # what built the workers' payloads (they hold another's after a load)

    @property
    def device_count(self) -> int:
        return self.layout.devices

    @property
    def timeout_s(self) -> float:
        """How long one call on the workers may take before they count as hung."""
        return self.config.cluster.step_timeout_s

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
        self.places = self.gather([w.where.remote() for w in self.workers], c.startup_timeout_s,
                                  "starting the host workers", bring_up=True)
        ips = {p["ip"] for p in self.places}
        ip = "127.0.0.1" if ips == {ray.util.get_node_ip_address()} else self.places[0]["ip"]
        port = self.gather([self.workers[0].free_port.remote(ip)], c.startup_timeout_s, "picking a port",
                           bring_up=True)[0]
        coordinator = f"{ip}:{port}"
        joined = self.gather(
            [w.initialize.remote(coordinator, layout.hosts, i, int(c.startup_timeout_s), c.heartbeat_timeout_s)
             for i, w in enumerate(self.workers)], c.startup_timeout_s + 30,
            f"jax.distributed bring-up (coordinator {coordinator})", bring_up=True)
        counts = {j["devices"] for j in joined}
        if counts != {layout.devices} or [j["process_index"] for j in joined] != list(range(layout.hosts)):
            raise ClusterError(f"the hosts disagree on the job: expected {layout.devices} devices and process "
                               f"indices 0..{layout.hosts - 1}, got {joined}")
        self.echo(f"fax: {layout.hosts} host workers joined ({layout.devices} {layout.kind} devices, "
                  f"coordinator {coordinator}): " + ", ".join(f"{p['hostname']} pid {p['pid']}" for p in self.places))

    def gather(self, refs: list[ray.ObjectRef], timeout: float, what: str, bring_up: bool = False) -> list[Any]:
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

    def load(self, what: str, factory: Factory, *args: Any) -> list[Any]:
        """Bring the group up if needed, then build every host's payload (``HostWorker.load``); their reports."""
        self.bring_up()
        self.factory = factory
        return self.gather([w.load.remote(factory, *args) for w in self.workers], self.timeout_s, what)

    def call_all(self, what: str, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` of every host's payload, and what each returned."""
        return self.gather([w.call.remote(method, *args) for w in self.workers], self.timeout_s, what)

    def worker_pids(self) -> list[int]:
        return [p["pid"] for p in self.places]

    def restart(self) -> None:
        """Tear the whole group down, waiting until the old workers are gone (one still writing a
        checkpoint would otherwise finish it while the fresh group resumes); the next ``bring_up``
        starts fresh actors."""
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        deadline = time.monotonic() + self.config.cluster.startup_timeout_s
        for worker in self.workers:
            while time.monotonic() < deadline:
                try:  # a call on a killed actor fails once Ray knows its process has ended
                    ray.get(worker.where.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except (RayActorError, ray.exceptions.GetTimeoutError):
                    break
                time.sleep(0.1)
        if self.group is not None:
            remove_placement_group(self.group)
        self.workers, self.group, self.places, self.factory = [], None, [], None

    def close(self) -> None:
        self.restart()
        if self.owns_ray:
            ray.shutdown()
