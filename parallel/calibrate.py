"""The present devices: what they are, and measured, so the cost model can use what they do instead of
datasheet figures.

``fax plan --calibrate`` times matmuls of a grid of shapes (rows x cols) on all devices at once (bfloat16 on
accelerators, whose peak is the bf16 rate; float32 on CPUs, which train in it) and all-reduces of two
sizes over all devices, and saves a profile per device kind and count: the matmul rates by shape fit
the efficiency curve's two knees and the peak (so the curve passes through the best measured rate),
and the all-reduce times give the link's bandwidth and latency under the ring model. A collective
permute of a small buffer (a pipeline tick's send) is timed apart: its fixed cost is not a ring step's.
``present_cluster`` reads the profile back.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fax.parallel.hardware import DEVICES, FAMILIES, ClusterSpec, Link, efficiency

# Matmul shapes timed: rows (tokens) x cols (features), over a fixed inner dimension; a grid, so
# that short and narrow matmuls (microbatches, tensor-parallel shards) are measured, not guessed.
MATMUL_GRID = {"cpu": ((64, 256, 1024, 4096), (16, 64, 256, 1024), 256),
               "accelerator": ((256, 1024, 4096, 16384), (64, 256, 1024, 8192), 8192)}
ALLREDUCE_BYTES = (2 ** 12, 2 ** 24)
# 1: square matmuls timed on one device alone, no fitted knees; 2: no ceiling (a fixed 0.6), and one row of
# each product used (XLA computed that row alone); 3: no send latency (a ring step's assumed)
PROFILE_VERSION = 4
# Device kinds as jax names them (lower case, no spaces) -> the family of ``hardware.DEVICES``, most specific first.
KINDS = (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v6lite", "v6e"), ("v6e", "v6e"), ("v5lite", "v5e"),
         ("v5e", "v5e"), ("v5p", "v5p"), ("tpuv5", "v5p"), ("v4", "v4"))


def race(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Each run's fastest time (seconds) over ``rounds`` rounds in which every run goes once, in
    turn, after a warm-up call each: the least disturbed by a shared machine, whose drift then
    reaches every run alike."""
    for run in runs.values():
        jax.block_until_ready(run())
    best = dict.fromkeys(runs, math.inf)
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            jax.block_until_ready(run())
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def best_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls after a warm-up."""
    return race({"fn": fn}, repeats)["fn"]


def line_mesh(devices: list):
    """All of ``devices`` on one axis "x", so a shard_map runs the same program on each."""
    return jax.make_mesh((len(devices),), ("x",), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices)


def matmul_rates(devices: list, chained: int = 16) -> dict[tuple[int, int], float]:
    """FLOP/s per device of [rows, k] x [k, cols] matmuls (random values), by (rows, cols), with
    every device of ``devices`` multiplying at once, as in a step (emulated CPU devices share the
    cores, and one device's per-op overheads hide behind another's work). ``chained`` dependent
    matmuls run in one program, so a small one is not timed as a launch."""
    cpu = devices[0].platform == "cpu"
    all_rows, all_cols, inner = MATMUL_GRID["cpu" if cpu else "accelerator"]
    dtype = jnp.float32 if cpu else jnp.bfloat16
    mesh = line_mesh(devices)
    sharded = NamedSharding(mesh, PartitionSpec("x"))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"))
    def chain(a: jax.Array, b: jax.Array) -> jax.Array:  # each product feeds the next one's weight
        # every row of the product is used (a slice of it would let XLA compute that row alone)
        return jax.lax.fori_loop(0, chained, lambda _, w: w + jnp.tanh(a @ w).mean(0, keepdims=True) * 1e-6, b)

    rates = {}
    for rows in all_rows:
        for cols in all_cols:
            a, b = (jax.jit(functools.partial(jax.random.normal, jax.random.key(i), (len(devices) * n, m), dtype),
                            out_shardings=sharded)()  # made in place: no device holds every operand
                    for i, (n, m) in enumerate(((rows, inner), (inner, cols))))
            rates[rows, cols] = 2 * rows * inner * cols / (best_time(lambda: chain(a, b)) / chained)
    return rates


def collective_time(devices: list, collective: Callable[[jax.Array], jax.Array], nbytes: int,
                    chained: int = 16) -> float:
    """Seconds of one ``collective`` (over mesh axis "x" of all ``devices``) of a buffer of ``nbytes`` per
    device: ``chained`` dependent ones run in one program, so the figure is the collective's own cost
    inside a compiled step, not a program launch's."""
    mesh = line_mesh(devices)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"))
    def chain(x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, chained, lambda _, y: collective(y), x)

    x = jax.device_put(jnp.ones((len(devices), nbytes // 4), jnp.float32), NamedSharding(mesh, PartitionSpec("x")))
    return best_time(lambda: chain(x)) / chained


def allreduce_times(devices: list) -> dict[int, float]:
    """Seconds to sum a buffer of each size held by every device into every device."""
    n = len(devices)
    return {nbytes: collective_time(devices, lambda y: jax.lax.pcast(jax.lax.psum(y, "x") / n, "x", to="varying"),
                                    nbytes) for nbytes in ALLREDUCE_BYTES}


def permute_time(devices: list) -> float:
    """Seconds of each device sending a small buffer to the next (a collective permute, as each pipeline
    tick does): a send's fixed cost."""
    ring = [(i, (i + 1) % len(devices)) for i in range(len(devices))]
    return collective_time(devices, lambda y: jax.lax.ppermute(y, "x", ring), ALLREDUCE_BYTES[0])


def fit_knees(rates: dict[tuple[int, int], float]) -> tuple[float, float]:
    """The (rows, cols) knees under which ``efficiency`` best matches measured matmul rates by
    (rows, cols) (least squares on the log of each rate relative to the fastest)."""
    best = max(rates, key=rates.get)

    def misfit(knees: tuple[float, float]) -> float:
        return sum((math.log(rates[shape] / rates[best])
                    - math.log(efficiency(*shape, knees, 1.0) / efficiency(*best, knees, 1.0))) ** 2 for shape in rates)
    grid = [10 ** (i / 20) for i in range(101)]  # 1 ... 1e5
    return min(itertools.product(grid, grid), key=misfit)


def link_from_allreduce(times: dict[int, float], n: int) -> tuple[float, float]:
    """(bandwidth B/s, latency s) of the ring model t = 2 (n-1)/n * bytes / bandwidth + 2 (n-1) * latency."""
    sizes = sorted(times)
    slope, intercept = np.polyfit(sizes, [times[s] for s in sizes], 1)
    bandwidth = 2 * (n - 1) / n / max(slope, 1e-15)
    return float(bandwidth), float(max(intercept, 0.0) / (2 * max(n - 1, 1)))


def profile_path(device_kind: str, count: int) -> Path:
    root = Path(os.environ.get("FAX_CACHE") or Path.home() / ".cache" / "fax")
    return root / "calibration" / f"{device_kind.replace(' ', '_').lower()}-{count}.json"


def calibrate(devices: list) -> dict[str, Any]:
    """Measure, save and return the profile of ``devices``: the efficiency curve's knees, and its
    ceiling against the datasheet peak (``present_cluster``'s), so that MFU stays against the datasheet."""
    rates = matmul_rates(devices)
    knees, best = fit_knees(rates), max(rates, key=rates.get)  # rates per device, all of them busy
    peak = present_cluster(devices, measured=False).device.peak_flops
    profile: dict[str, Any] = {"version": PROFILE_VERSION, "device_kind": devices[0].device_kind,
                               "devices": len(devices),
                               "matmul_flops": {f"{r}x{c}": rate for (r, c), rate in rates.items()},
                               "best_matmul_flops": rates[best], "matmul_knees": knees,
                               "matmul_ceiling": rates[best] / efficiency(*best, knees, 1.0) / peak}
    if len(devices) > 1:
        times = allreduce_times(devices)
        bandwidth, latency = link_from_allreduce(times, len(devices))
        profile.update(allreduce_s={str(b): t for b, t in times.items()}, link_bandwidth=bandwidth,
                       link_latency=latency, permute_latency=permute_time(devices))
    path = profile_path(devices[0].device_kind, len(devices))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    profile["path"] = str(path)
    return profile


def load_profile(device_kind: str, count: int) -> dict[str, Any] | None:
    """The saved profile of these devices, or None when there is none or it is from an older fax."""
    path = profile_path(device_kind, count)
    if not path.exists():
        return None
    profile = json.loads(path.read_text())
    if profile.get("version") != PROFILE_VERSION:
        warnings.warn(f"{path} was measured by an older fax; planning from "
                      f"datasheet figures: re-run `fax plan --calibrate` to measure these devices again", stacklevel=2)
        return None
    return profile


def present_cluster(devices: list | None = None, measured: bool = True) -> ClusterSpec:
    """The devices this process sees (datasheet figures by device kind; CPU: nominal), with what
    ``fax plan --calibrate`` measured of them unless ``measured`` is false."""
    devices = jax.devices() if devices is None else devices
    kind = devices[0].device_kind.lower().replace(" ", "")
    family = next((f for pattern, f in KINDS if pattern in kind), "cpu")
    per_host = sum(d.process_index == devices[0].process_index for d in devices)
    _, intra, inter, _, _ = FAMILIES[family]
    device = DEVICES[family]
    if family == "cpu":  # the cores are shared by the emulated devices
        cores = os.cpu_count() or 1
        device = dataclasses.replace(device, peak_flops=50e9 * cores / per_host)
    name = f"{family}-{len(devices)} (present)"
    profile = load_profile(devices[0].device_kind, len(devices)) if measured else None
    if profile is not None:  # measured by `fax plan --calibrate`
        device = dataclasses.replace(device, matmul_knees=tuple(profile["matmul_knees"]),
                                     matmul_ceiling=profile["matmul_ceiling"])
        if "link_bandwidth" in profile:
            intra = Link(profile["link_bandwidth"], profile["link_latency"], profile["permute_latency"])
        name = f"{family}-{len(devices)} (present, calibrated)"
    return ClusterSpec(name, device, len(devices) // per_host, per_host, intra, inter, present=True)
