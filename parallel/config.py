"""Parallelism settings and schedule arithmetic: plain Python, read by the config, the planner and the executor."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Outermost first: pipeline stages and data replicas cross the slowest links, tensor the fastest.
MESH_AXES = ("stage", "data", "fsdp", "expert", "sequence", "tensor")
DCN_AXES = ("stage", "data", "fsdp")  # the axes that may span slices (parallel.dcn_<axis>)


@dataclass(frozen=True)
class ParallelConfig:
    """Size of each mesh axis; one axis may be -1 to take the remaining devices."""

    stage: int = 1  # pipeline stages (consecutive layers each)
    data: int = 1  # data-parallel replicas (params replicated)
    fsdp: int = -1  # data parallelism with params, gradients and optimizer state sharded (ZeRO-3)
    # a mixture of experts' experts split across devices, tokens sent to their experts by all-to-all; the
    # rest of the model treats it as more fsdp (the batch and the other params split over it too)
    expert: int = 1
    sequence: int = 1  # the sequence split across devices
    tensor: int = 1  # heads, MLP and vocabulary split across devices (Megatron)
    # Megatron's sequence parallelism: between the blocks, the residual stream and its norms are split
    # along the sequence over the tensor axis too (all-gathered before the attention and MLP, reduce-
    # scattered after them, instead of all-reduced), dividing those activations by parallel.tensor
    tensor_sequence: bool = False
    # Pipeline schedule (with stage > 1): each stage holds this many chunks of layers, a microbatch
    # going round the stages as often, which divides the bubble by about as much (Megatron's interleaved
    # schedule; train.microbatches a multiple of stage; with stage_remat). Costs an all-to-all of the
    # stage's params per step.
    virtual_stages: int = 1
    # Each tick's stage recomputed from its input in the backward pass: activation memory no longer grows
    # with train.microbatches (one hidden state per tick, plus one microbatch's layers at a time), for
    # one more forward pass of the stack (none more than model.remat=full, with model.remat=none)
    stage_remat: bool = False
    # Many slices (TPU slices over the data-centre network, or groups of hosts): how many slices each of
    # these axes spans, the rest of the axis inside each slice. Their product is the number of slices;
    # each divides its axis's size (e.g. parallel.data=4 parallel.dcn_data=2: 2 replicas per slice).
    dcn_stage: int = 1  # slices the pipeline stages span
    dcn_data: int = 1  # slices the data replicas span (the usual choice: only gradients cross slices)
    dcn_fsdp: int = 1  # slices the fsdp shards span

    @property
    def slices(self) -> int:
        return math.prod(getattr(self, f"dcn_{axis}") for axis in DCN_AXES)

    def slice_sizes(self, sizes: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
        """(each axis's share inside a slice, its share across slices) of resolved axis ``sizes``;
        ValueError names the setting that does not divide."""
        across = {axis: getattr(self, f"dcn_{axis}", 1) for axis in MESH_AXES}
        for axis in DCN_AXES:
            if across[axis] < 1 or sizes[axis] % across[axis]:
                raise ValueError(f"parallel.dcn_{axis}={across[axis]} must be a positive divisor of parallel.{axis}="
                                 f"{sizes[axis]} (the slices it spans)")
        return {axis: sizes[axis] // across[axis] for axis in MESH_AXES}, across

    def problems(self, sizes: dict[str, int], units: int, microbatches: int) -> list[str]:
        """What of the pipeline schedule and the slices does not fit resolved axis ``sizes`` for a stack of
        ``units`` blocks (``stack_units``)."""
        if self.virtual_stages < 1:
            return [f"parallel.virtual_stages={self.virtual_stages} must be >= 1 (1: one chunk of layers per stage)"]
        found = []
        chunks = sizes["stage"] * self.virtual_stages
        if units % chunks:
            found.append(f"the stack's {units} blocks (model.n_layers, or a mixture of experts' groups of "
                         f"model.moe_every after model.moe_first_dense) do not split into parallel.stage={sizes['stage']} x "
                         f"parallel.virtual_stages={self.virtual_stages} = {chunks} pipeline chunks; choose stage "
                         "and virtual stage counts whose product divides it")
        if sizes["stage"] > 1:
            found.extend(Schedule(sizes["stage"], microbatches, self.virtual_stages, self.stage_remat).problems())
        try:
            self.slice_sizes(sizes)
        except ValueError as e:
            found.append(str(e))
        return found

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


@dataclass(frozen=True)
class Schedule:
    """How microbatches flow through the pipeline stages (``fax.parallel.pipeline``)."""

    stages: int
    microbatches: int
    virtual: int = 1  # chunks of the stack per stage: a microbatch goes round the stages this often
    stage_remat: bool = False  # each tick's stage recomputed from its input in the backward pass

    @property
    def ticks(self) -> int:
        """Every microbatch enters stage 0 V times; the last needs S - 1 more ticks to leave."""
        return self.virtual * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Share of stage-ticks idle (or computing discarded work): (S - 1) / (V M + S - 1)."""
        return (self.stages - 1) / self.ticks

    @property
    def head_spread(self) -> bool:
        """Whether the pipeline's output rows split over the stages (whole groups of S microbatches),
        so that each stage runs the LM head and loss on its share; else every stage runs them all."""
        return self.microbatches % self.stages == 0

    def problems(self) -> list[str]:
        if self.virtual > 1 and not self.stage_remat:
            return [f"parallel.virtual_stages={self.virtual} needs parallel.stage_remat=true (each tick's chunk of "
                    "layers is then chosen again in the backward pass, not kept per tick)"]
        if self.virtual > 1 and self.microbatches % self.stages:
            return [f"parallel.virtual_stages={self.virtual} sends microbatches round the {self.stages} stages in "
                    f"groups of {self.stages}: train.microbatches={self.microbatches} must be a multiple of "
                    "parallel.stage (or set parallel.virtual_stages=1)"]
        return []
