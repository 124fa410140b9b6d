"""Parallelism settings and schedule arithmetic: plain Python, read by the config, the planner and the executor."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Outermost first: pipeline stages and data replicas cross the slowest links, tensor the fastest.
MESH_AXES = ("stage", "data", "fsdp", "sequence", "tensor")


@dataclass(frozen=True)
class ParallelConfig:
    """Size of each mesh axis; one axis may be -1 to take the remaining devices."""

    stage: int = 1  # pipeline stages (consecutive layers each)
    data: int = 1  # data-parallel replicas (params replicated)
    fsdp: int = -1  # data parallelism with params, gradients and optimizer state sharded (ZeRO-3)
    sequence: int = 1  # the sequence split across devices
    tensor: int = 1  # heads, MLP and vocabulary split across devices (Megatron)
    # Megatron's sequence parallelism: between the blocks, the residual stream and its norms are split
    # along the sequence over the tensor axis too (all-gathered before the attention and MLP, reduce-
    # scattered after them, instead of all-reduced), dividing those activations by parallel.tensor
    tensor_sequence: bool = False

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        """Resolve -1 against ``n_devices``; ValueError names the setting when it cannot fit."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        desc = " x ".join(f"parallel.{k}={v}" for k, v in sizes.items())
        fill = [k for k, v in sizes.items() if v == -1]
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"parallel.{bad[0]}={sizes[bad[0]]}: mesh axis sizes must be positive or -1 (fill)")
        if len(fill) > 1:
            raise ValueError(f"only one mesh axis may be -1, got {', '.join('parallel.' + k for k in fill)}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if fill:
            if n_devices % fixed:
                raise ValueError(f"{desc}: the fixed axes multiply to {fixed}, which does not divide the "
                                 f"{n_devices} devices; change them so their product divides {n_devices}")
            sizes[fill[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise ValueError(f"{desc}: the mesh has {fixed} devices but {n_devices} are available; make the "
                             f"product equal {n_devices} or set one axis to -1")
        return sizes


def ticks(stages: int, microbatches: int) -> int:
    """Schedule length: every microbatch enters stage 0 once; the last needs stages - 1 more ticks."""
    return microbatches + stages - 1


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of stage-ticks idle (or computing discarded work): (S - 1) / (M + S - 1)."""
    return (stages - 1) / ticks(stages, microbatches)
