"""Device mesh from a parallelism setting: within one slice, or over many (``parallel.dcn_*``)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from fax.parallel.config import MESH_AXES, ParallelConfig


def slice_groups(devices: Sequence[jax.Device], slices: int) -> list[list[jax.Device]]:
    """``devices`` in ``slices`` groups: by TPU slice where the devices know theirs, else by host
    (whole processes), else (one process emulating many) in order of id. ValueError when they do
    not split so."""
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        key = lambda d: d.slice_index  # noqa: E731
    elif len({d.process_index for d in devices}) > 1:
        key = lambda d: d.process_index  # noqa: E731
    else:
        ordered = sorted(devices, key=lambda d: d.id)
        if len(ordered) % slices:
            raise ValueError(f"{len(ordered)} devices do not split into {slices} slices (the product of parallel.dcn_*)")
        size = len(ordered) // slices
        return [ordered[i * size:(i + 1) * size] for i in range(slices)]
    groups: dict[int, list[jax.Device]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    if len(groups) % slices or len({len(g) for g in groups.values()}) != 1:
        raise ValueError(f"the devices are on {len(groups)} slices or hosts, which do not split evenly into {slices} "
                         "slices (the product of parallel.dcn_*)")
    per_slice = len(groups) // slices
    keys = sorted(groups)
    return [[d for k in keys[i * per_slice:(i + 1) * per_slice] for d in groups[k]] for i in range(slices)]


def make_mesh(parallel: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices) with Auto axes, so XLA propagates shardings.
    Over many slices each axis is its ``dcn`` share across slices (outer) times its share inside
    each (inner): collectives of an axis inside a slice never cross the slow network."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parallel.axis_sizes(len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    tpu_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if parallel.slices == 1 and tpu_slices > 1:
        raise ValueError(f"the devices are {tpu_slices} TPU slices joined by the data-centre network: say which "
                         f"axes span them, e.g. parallel.dcn_data={tpu_slices} (parallel.dcn_stage, dcn_data and "
                         f"dcn_fsdp multiply to the {tpu_slices} slices)")
    if parallel.slices == 1:  # a torus's physical axes may be split (tensor=2 on a 4x4x4 slice)
        grid = mesh_utils.create_device_mesh(tuple(sizes[a] for a in MESH_AXES), devices,
                                             allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)
    inside, across = parallel.slice_sizes(sizes)
    inner = tuple(inside[a] for a in MESH_AXES)
    blocks = [mesh_utils.create_device_mesh(inner, group, allow_split_physical_axes=True)
              for group in slice_groups(devices, parallel.slices)]
    grid = np.stack(blocks).reshape(*(across[a] for a in MESH_AXES), *inner)
    n = len(MESH_AXES)  # interleave (across_i, inside_i) for every axis, then merge each pair
    grid = grid.transpose([i for axis in range(n) for i in (axis, n + axis)])
    return Mesh(grid.reshape(tuple(sizes[a] for a in MESH_AXES)), MESH_AXES, axis_types=types)
