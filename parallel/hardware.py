"""Clusters the planner can plan for: devices, hosts and the links each mesh axis may cross.

Datasheet figures (dense bf16 peak, HBM size and bandwidth, per-device link bandwidth in one
direction). TPU slices are ICI-connected across hosts, so a TPU slice has one link kind; GPU nodes
have NVLink inside a node and InfiniBand (8 NICs per node) across nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 2 ** 30
PEAK_EFFICIENCY = 0.6  # the best fraction of peak a large matmul reaches
# Per-device matmul rows (tokens) and columns (features) whose shortfall each costs as much time as
# the matmul's own work (see ``efficiency``); calibration fits both to the present devices.
MATMUL_KNEES = (512.0, 128.0)


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    platform: str  # jax's platform name: tpu, gpu, cpu
    matmul_knees: tuple[float, float] = MATMUL_KNEES  # (rows, columns)


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per device, one direction
    latency: float  # seconds per collective step


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    device: Device
    hosts: int
    devices_per_host: int
    intra: Link  # between devices of one host (ICI, NVLink, shared memory)
    inter: Link  # between hosts (ICI within a TPU slice, InfiniBand, DCN)
    present: bool = False  # the devices of this process (plans can be compiled and run)

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host


DEVICES = {
    "v4": Device("TPU v4", 275e12, 32 * GiB, 1.2e12, "tpu"),
    "v5e": Device("TPU v5e", 197e12, 16 * GiB, 0.82e12, "tpu"),
    "v5p": Device("TPU v5p", 459e12, 95 * GiB, 2.76e12, "tpu"),
    "a100": Device("A100 80GB SXM", 312e12, 80 * GiB, 2.04e12, "gpu"),
    "h100": Device("H100 80GB SXM", 989e12, 80 * GiB, 3.35e12, "gpu"),
    "cpu": Device("CPU (emulated device)", 12.5e9, 2 * GiB, 5e9, "cpu"),
}
# (devices per host, intra-host link, inter-host link, how the name counts devices)
FAMILIES = {
    "v4": (4, Link(45e9, 5e-6), Link(45e9, 5e-6), "cores"),  # 2 TensorCores per chip in the name
    "v5p": (4, Link(90e9, 5e-6), Link(90e9, 5e-6), "cores"),
    "v5e": (4, Link(45e9, 5e-6), Link(45e9, 5e-6), "chips"),
    "a100": (8, Link(300e9, 8e-6), Link(25e9, 15e-6), "chips"),  # NVLink 3; 8 x 200 Gb/s HDR per node
    "h100": (8, Link(450e9, 8e-6), Link(50e9, 15e-6), "chips"),  # NVLink 4; 8 x 400 Gb/s NDR per node
    "cpu": (8, Link(5e9, 50e-6), Link(1e9, 100e-6), "chips"),  # emulated devices: memcpy, TCP (gloo)
}
PRESET_EXAMPLES = ("v4-8", "v4-1024", "v5e-256", "v5p-512", "a100-64", "h100-1024", "cpu-8")


def efficiency(rows: float, cols: float, knees: tuple[float, float] = MATMUL_KNEES) -> float:
    """Fraction of peak for per-device matmuls of ``rows`` tokens by ``cols`` features. Short sides
    add time in proportion to knee / side (tiling, per-op overheads): 1 / efficiency =
    (1 + rows knee / rows + cols knee / cols) / PEAK_EFFICIENCY."""
    return PEAK_EFFICIENCY / (1.0 + knees[0] / rows + knees[1] / cols)


def cluster_preset(name: str) -> ClusterSpec:
    """``<family>-<count>``: ``v4-1024`` (TPU names count TensorCores for v4/v5p), ``h100-1024``, ``cpu-8``."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if not match or match.group(1) not in FAMILIES:
        raise ValueError(f"unknown cluster {name!r}; use <family>-<count> with family one of "
                         f"{', '.join(FAMILIES)}, e.g. {', '.join(PRESET_EXAMPLES)}")
    family, count = match.group(1), int(match.group(2))
    per_host, intra, inter, counts = FAMILIES[family]
    chips = count // 2 if counts == "cores" else count
    if chips < 1 or (chips > per_host and chips % per_host):
        raise ValueError(f"{name}: {chips} devices do not fill whole hosts of {per_host}")
    hosts, per_host = (1, chips) if chips <= per_host else (chips // per_host, per_host)
    return ClusterSpec(name, DEVICES[family], hosts, per_host, intra, inter)


@dataclass(frozen=True)
class TpuTopology:
    """A TPU slice (or several) for ahead-of-time compilation (``jax.experimental.topologies``)."""

    name: str  # e.g. v5p:8x8x4
    chip_config: str  # "megacore" where a chip's two TensorCores are one device (v4; v5p's default)
    slices: int
    chips_per_host: tuple[int, int, int] = (2, 2, 1)


def tpu_topology(name: str) -> tuple[TpuTopology, ClusterSpec]:
    """``<family>-<count>[x<slices>]`` (``v5p-512``, ``v5e-256x4``) as a TPU topology to compile for,
    and the cluster preset of one slice. The slice's chips are laid out as the torus of that size:
    2D for v5e, 3D for v4 and v5p."""
    base, _, slices = name.partition("x") if re.fullmatch(r"[a-z0-9]+-\d+x\d+", name) else (name, "", "1")
    cluster = cluster_preset(base)
    if cluster.device.platform != "tpu":
        raise ValueError(f"{name}: ahead-of-time compilation is for TPU slices (v4, v5e, v5p); "
                         "on GPUs compile on the present devices (no --cluster)")
    chips = cluster.devices
    dims = [2, 2] if base.startswith("v5e") else [2, 2, 1]
    if chips < 4 or chips & (chips - 1):
        raise ValueError(f"{name}: {chips} chips is not a TPU slice size (a power of two, at least 4)")
    while dims[0] * dims[1] * (dims[2] if len(dims) == 3 else 1) < chips:
        smallest = min(range(len(dims)), key=lambda i: (dims[i], -i))
        dims[smallest] *= 2
    family = base.split("-")[0]
    return TpuTopology(f"{family}:{'x'.join(map(str, dims))}", "megacore" if family == "v4" else "default",
                       int(slices)), cluster
