"""Measure the present devices so the cost model can use what they do instead of datasheet figures.

``fax plan --calibrate`` times square matmuls of growing size on one device (bfloat16 on accelerators,
whose peak is the bf16 rate; float32 on CPUs, which train in it) and all-reduces of two
sizes over all devices, and saves a profile per device kind and count. ``present_cluster`` reads
it back: the matmul rates by size set the efficiency curve's knee and the peak (so the curve passes
through the best measured rate), and the all-reduce times give the link's bandwidth and latency
under the ring model.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MATMUL_SIZES = {"cpu": (128, 256, 512, 1024, 2048), "accelerator": (512, 1024, 2048, 4096, 8192)}
ALLREDUCE_BYTES = (2 ** 12, 2 ** 24)


def best_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls after a warm-up (the least disturbed by a shared machine)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_rates(device: Any) -> dict[int, float]:
    """FLOP/s of an n x n by n x n matmul (random values) on ``device``, by n."""
    import jax
    import jax.numpy as jnp

    cpu = device.platform == "cpu"
    rates = {}
    for n in MATMUL_SIZES["cpu" if cpu else "accelerator"]:
        a = jax.device_put(jax.random.normal(jax.random.key(n), (n, n), jnp.float32 if cpu else jnp.bfloat16), device)
        matmul = jax.jit(lambda x: x @ x)
        rates[n] = 2 * n ** 3 / best_time(lambda: matmul(a))
    return rates


def allreduce_times(devices: list, chained: int = 16) -> dict[int, float]:
    """Seconds to sum a buffer of each size held by every device into every device: ``chained``
    dependent all-reduces run in one program, so the figure is the collective's own cost inside a
    compiled step, not a program launch's."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    n = len(devices)
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"))
    def chain(x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, chained, lambda _, y: jax.lax.pcast(jax.lax.psum(y, "x") / n, "x", to="varying"), x)

    times = {}
    for nbytes in ALLREDUCE_BYTES:
        x = jax.device_put(jnp.ones((n, nbytes // 4), jnp.float32), NamedSharding(mesh, PartitionSpec("x")))
        times[nbytes] = best_time(lambda: chain(x)) / chained
    return times


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
    """Measure, save and return the profile of ``devices``."""
    rates = matmul_rates(devices[0])
    profile: dict[str, Any] = {"device_kind": devices[0].device_kind, "devices": len(devices),
                               "matmul_flops": {str(n): r for n, r in rates.items()},
                               "best_matmul_flops": max(rates.values())}
    if len(devices) > 1:
        times = allreduce_times(devices)
        bandwidth, latency = link_from_allreduce(times, len(devices))
        profile.update(allreduce_s={str(b): t for b, t in times.items()}, link_bandwidth=bandwidth,
                       link_latency=latency)
    path = profile_path(devices[0].device_kind, len(devices))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    profile["path"] = str(path)
    return profile


def load_profile(device_kind: str, count: int) -> dict[str, Any] | None:
    path = profile_path(device_kind, count)
    return json.loads(path.read_text()) if path.exists() else None
