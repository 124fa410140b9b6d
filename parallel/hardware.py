"""Clusters the planner can plan for: devices, hosts and the links each mesh axis may cross.

Datasheet figures (dense bf16 peak, HBM size and bandwidth, per-device link bandwidth in one
direction), and one measured figure per device: the fraction of peak its largest bf16 matmuls reach
(``matmul_ceiling``). TPU slices are ICI-connected across hosts (a torus: an axis spanning more of its
dimensions has more links), slices talk over the data-centre network (DCN); GPU nodes have NVLink
inside a node and InfiniBand (one NIC per GPU) across nodes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GiB = 2 ** 30
# Emulated CPU devices: per-matmul rows (tokens) and columns (features) whose shortfall each costs as much
# time as the matmul's own work (see ``efficiency``), and the best fraction of nominal peak; calibration fits
# both to the present devices. Accelerators' knees come from their roofline (``Device.knees``).
CPU_KNEES, CPU_CEILING = (512.0, 128.0), 0.6


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    platform: str  # jax's platform name: tpu, gpu, cpu
    # The fraction of peak the largest bf16 matmuls reach in a training step: the best hardware-FLOP rate
    # of published runs (MaxText: 512B on v5p at 64% MFU with full recomputation is 85% of peak; 32B on
    # v5e at 67% MFU, full recomputation, ~89%; Megatron-LM on A100s ~0.6-0.7 inside the pipeline),
    # within the ~0.7-0.75 of peak cuBLAS reaches on large bf16 GEMMs on A100s and H100s.
    matmul_ceiling: float = 0.75
    matmul_knees: tuple[float, float] | None = None  # (rows, columns); None: the roofline's

    @property
    def knees(self) -> tuple[float, float]:
        """Where a matmul's HBM traffic costs as much as its FLOPs: a [rows, k] x [k, cols] product in 16
        bits moves 2 (rows k + k cols) bytes for 2 rows k cols FLOPs, so a side of peak / bandwidth
        (at the ceiling's rate) is the knee of both."""
        if self.matmul_knees is not None:
            return self.matmul_knees
        side = self.matmul_ceiling * self.peak_flops / self.hbm_bandwidth
        return side, side


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per device, one direction
    latency: float  # seconds per collective step
    # seconds of a point-to-point send's fixed cost (a pipeline tick's collective permute); None: one
    # step's. Measured apart on the present devices: XLA's CPU backend makes every send a rendezvous of
    # all devices, far above a ring step's share of an all-reduce.
    permute_latency: float | None = None

    @property
    def send_latency(self) -> float:
        return self.latency if self.permute_latency is None else self.permute_latency


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    device: Device
    hosts: int
    devices_per_host: int
    intra: Link  # between devices of one host (ICI, NVLink, shared memory)
    inter: Link  # between hosts (ICI within a TPU slice, InfiniBand)
    present: bool = False  # the devices of this process (plans can be compiled and run)
    slices: int = 1  # TPU slices (or GPU pods) joined by the data-centre network
    dcn: Link = Link(12.5e9, 50e-6)  # between slices, per device
    torus: tuple[int, ...] = ()  # a TPU slice's chips per torus dimension (its ICI links by dimension)

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def slice_devices(self) -> int:
        return self.devices // self.slices


DEVICES = {
    "v4": Device("TPU v4", 275e12, 32 * GiB, 1.2e12, "tpu", 0.9),
    "v5e": Device("TPU v5e", 197e12, 16 * GiB, 0.82e12, "tpu", 0.9),
    "v5p": Device("TPU v5p", 459e12, 95 * GiB, 2.76e12, "tpu", 0.85),
    "v6e": Device("TPU v6e", 918e12, 32 * GiB, 1.64e12, "tpu", 0.9),
    "a100": Device("A100 80GB SXM", 312e12, 80 * GiB, 2.04e12, "gpu", 0.7),
    "h100": Device("H100 80GB SXM", 989e12, 80 * GiB, 3.35e12, "gpu", 0.75),
    "h200": Device("H200 141GB SXM", 989e12, 141 * GiB, 4.8e12, "gpu", 0.75),
    "cpu": Device("CPU (emulated device)", 12.5e9, 2 * GiB, 5e9, "cpu", CPU_CEILING, CPU_KNEES),
}
# (devices per host, intra-host link, inter-host link, how the name counts devices, DCN per device). A TPU
# link is one torus dimension's ring in both directions; GPUs: NVLink inside a node, one NIC per GPU across.
FAMILIES = {
    "v4": (4, Link(45e9, 5e-6), Link(45e9, 5e-6), "cores", Link(6.25e9, 50e-6)),  # 2 TensorCores a chip
    "v5p": (4, Link(90e9, 5e-6), Link(90e9, 5e-6), "cores", Link(12.5e9, 50e-6)),
    "v5e": (4, Link(45e9, 5e-6), Link(45e9, 5e-6), "chips", Link(6.25e9, 50e-6)),
    "v6e": (4, Link(90e9, 5e-6), Link(90e9, 5e-6), "chips", Link(12.5e9, 50e-6)),
    "a100": (8, Link(300e9, 8e-6), Link(25e9, 15e-6), "chips", Link(25e9, 15e-6)),  # NVLink 3; HDR 200 Gb/s
    "h100": (8, Link(450e9, 8e-6), Link(50e9, 15e-6), "chips", Link(50e9, 15e-6)),  # NVLink 4; NDR 400 Gb/s
    "h200": (8, Link(450e9, 8e-6), Link(50e9, 15e-6), "chips", Link(50e9, 15e-6)),
    "cpu": (8, Link(5e9, 50e-6), Link(1e9, 100e-6), "chips", Link(1e9, 100e-6)),  # memcpy, TCP (gloo)
}
PRESET_EXAMPLES = ("v4-8", "v4-1024", "v5e-256", "v5p-512", "v5p-512x4", "v6e-256", "a100-64", "h100-1024",
                   "h200-64", "cpu-8")


def efficiency(rows: float, cols: float, knees: tuple[float, float], ceiling: float) -> float:
    """Fraction of peak for per-device matmuls of ``rows`` tokens by ``cols`` features: the ceiling for
    large ones; each short side adds time in proportion to knee / side (HBM traffic, tiling):
    1 / efficiency = (1 + rows knee / rows + cols knee / cols) / ceiling."""
    return ceiling / (1.0 + knees[0] / rows + knees[1] / cols)


def cluster_preset(name: str) -> ClusterSpec:
    """``<family>-<count>[x<slices>]``: ``v4-1024`` (TPU names count TensorCores for v4/v5p), ``h100-1024``,
    ``v5p-512x4`` (4 slices of v5p-512 over DCN), ``cpu-8``."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)(?:x(\d+))?", name)
    if not match or match.group(1) not in FAMILIES:
        raise ValueError(f"unknown cluster {name!r}; use <family>-<count>[x<slices>] with family one of "
                         f"{', '.join(FAMILIES)}, e.g. {', '.join(PRESET_EXAMPLES)}")
    family, count, slices = match.group(1), int(match.group(2)), int(match.group(3) or 1)
    per_host, intra, inter, counts, dcn = FAMILIES[family]
    chips = count // 2 if counts == "cores" else count
    if chips < 1 or slices < 1 or (chips > per_host and chips % per_host):
        raise ValueError(f"{name}: {chips} devices do not fill whole hosts of {per_host}")
    hosts, per_host = (1, chips) if chips <= per_host else (chips // per_host, per_host)
    device = DEVICES[family]
    torus = torus_shape(family, chips) if device.platform == "tpu" and chips >= 4 and not chips & (chips - 1) else ()
    return ClusterSpec(name, device, hosts * slices, per_host, intra, inter, slices=slices, dcn=dcn, torus=torus)


def torus_shape(family: str, chips: int) -> tuple[int, ...]:
    """A TPU slice's chips per torus dimension (2D for v5e and v6e, 3D for v4 and v5p), as even as the
    chip count allows, the first dimensions growing first."""
    dims = [2, 2] if family in ("v5e", "v6e") else [2, 2, 1]
    while math.prod(dims) < chips:
        smallest = min(range(len(dims)), key=lambda i: (dims[i], -i))
        dims[smallest] *= 2
    return tuple(dims)


@dataclass(frozen=True)
class TpuTopology:
    """A TPU slice (or several) for ahead-of-time compilation (``jax.experimental.topologies``)."""

    name: str  # e.g. v5p:8x8x4
    chip_config: str  # "megacore" where a chip's two TensorCores are one device (v4; v5p's default)
    slices: int
    chips_per_host: tuple[int, int, int] = (2, 2, 1)


def tpu_topology(name: str) -> tuple[TpuTopology, ClusterSpec]:
    """``<family>-<count>[x<slices>]`` (``v5p-512``, ``v5e-256x4``) as a TPU topology to compile for
    (each slice's chips laid out as its torus), and the cluster preset of the same name."""
    cluster = cluster_preset(name)
    if cluster.device.platform != "tpu":
        raise ValueError(f"{name}: ahead-of-time compilation is for TPU slices (v4, v5e, v5p, v6e); "
                         "on GPUs compile on the present devices (no --cluster)")
    if not cluster.torus:
        raise ValueError(f"{name}: {cluster.slice_devices} chips is not a TPU slice size (a power of two, at "
                         "least 4)")
    family = name.split("-")[0]
    return TpuTopology(f"{family}:{'x'.join(map(str, cluster.torus))}", "megacore" if family == "v4" else "default",
                       cluster.slices), cluster
