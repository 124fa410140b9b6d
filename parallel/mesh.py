"""Device mesh from a parallelism setting."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from fax.parallel.config import MESH_AXES, ParallelConfig


def make_mesh(parallel: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices) with Auto axes, so XLA propagates shardings."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parallel.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
