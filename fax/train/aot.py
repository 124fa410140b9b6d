"""``fax compile``: the exact train step of a config compiled ahead of time, for a TPU slice that is
not here (XLA's real TPU compiler, through libtpu, on any machine) or for the present devices, and
what XLA says of it: memory per device against the chip's HBM, collectives by mesh axis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
from jax.experimental import topologies

from fax.checkpoint import abstract_like
from fax.config import Config, ConfigError, validate
from fax.parallel.calibrate import present_cluster
from fax.parallel.hardware import tpu_topology
from fax.parallel.hlo import collectives, fits_device, memory_needed
from fax.parallel.validation import out_of_memory
from fax.train import step as step_lib
from fax.train.runtime import run_mesh


@dataclass(frozen=True)
class CompiledStep:
    """XLA's figures for one device of a compiled train step."""

    target: str  # the cluster it was compiled for
    devices: int
    device_kind: str
    platform: str
    mesh: dict[str, int]
    argument_bytes: int  # params, optimizer state and the batch shard
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments' buffers
    temp_bytes: int  # activations and XLA's scratch
    needed_bytes: float  # what the step needs by XLA's account (``memory_needed``: on TPUs its peak)
    hbm_bytes: float
    collectives: dict[str, int]  # "all-gather over fsdp" -> occurrences in the partitioned program
    compile_s: float
    out_of_memory: str = ""  # the compiler's own refusal (TPU: it checks HBM itself); then no figures

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and fits_device(self.needed_bytes, self.hbm_bytes, self.platform)


def target_devices(cluster: str) -> tuple[list[Any], float, str]:
    """The devices to compile for, the HBM of one, and the target's name: a TPU slice preset
    (``v5p-512``, ``v5e-256x4`` for 4 slices), or with ``cluster`` empty the present devices."""
    if not cluster:
        here = present_cluster()
        return jax.devices(), here.device.hbm_bytes, here.name
    try:
        topology, spec = tpu_topology(cluster)
    except ValueError as e:
        raise ConfigError(f"--cluster {cluster}: {e}") from None
    try:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.name, chip_config_name=topology.chip_config,
            chips_per_host_bounds=topology.chips_per_host, num_slices=topology.slices).devices
    except (RuntimeError, ValueError) as e:  # no TPU compiler here, or another process holds it
        raise ConfigError(f"--cluster {cluster}: the TPU compiler did not start ({str(e).splitlines()[0][:300]}); "
                          "it needs libtpu (pip install -e \".[tpu]\"), which one process at a time may use") from None
    return list(devices), spec.device.hbm_bytes, cluster


def compile_step(config: Config, devices: list[Any], hbm_bytes: float, target: str) -> CompiledStep:
    """Build and compile ``config``'s train step on a mesh of ``devices`` (nothing allocated, nothing
    run); bad settings are refused before the compile, naming the setting."""
    sizes = validate(config, len(devices))
    started = time.perf_counter()
    training = step_lib.build(config, run_mesh(config, devices))
    state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
    try:
        compiled = step_lib.compile_step(training, state, (config.train.batch_size, config.seq_len + 1))
    except jax.errors.JaxRuntimeError as e:
        if not out_of_memory(e):
            raise
        return CompiledStep(target, len(devices), devices[0].device_kind, devices[0].platform, sizes, 0, 0, 0, 0, 0,
                            hbm_bytes, {}, time.perf_counter() - started, str(e).split(": ", 1)[-1].splitlines()[0])
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    platform = devices[0].platform
    return CompiledStep(target, len(devices), devices[0].device_kind, platform, sizes, memory.argument_size_in_bytes,
                        memory.output_size_in_bytes, memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                        memory_needed(memory, platform), hbm_bytes, collectives(compiled.as_text(), sizes), seconds)
