"""A candidate layout and the workload it runs: the planner's vocabulary (``parallel.cost`` prices
one, ``parallel.memory`` sizes it, ``parallel.planner`` searches them)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from fax.models.config import (ModelConfig, attention_implementation, layer_mix, mixed_layers, param_count,
                               train_flops_per_token)
from fax.parallel.config import Schedule


@dataclass(frozen=True)
class Candidate:
    stages: int = 1
    microbatches: int = 1
    data: int = 1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    remat: str = "none"
    loss_chunks: int = 1  # pieces of the sequence the LM head and loss run in (train.loss_chunks)
    virtual_stages: int = 1  # parallel.virtual_stages: chunks of layers per pipeline stage
    stage_remat: bool = False  # parallel.stage_remat: each tick's stage recomputed in the backward
    tensor_sequence: bool = False  # parallel.tensor_sequence: the residual stream split over tensor too
    expert: int = 1  # parallel.expert: a mixture's experts split over devices (more fsdp for the rest)

    @functools.cached_property
    def schedule(self) -> Schedule:
        return Schedule(self.stages, self.microbatches, self.virtual_stages, self.stage_remat)

    @functools.cached_property
    def axes(self) -> dict[str, int]:
        return {"stage": self.stages, "data": self.data, "fsdp": self.fsdp, "expert": self.expert,
                "sequence": self.sequence, "tensor": self.tensor}

    @property
    def batch_shards(self) -> int:
        """The devices a step's rows are split over."""
        return self.data * self.fsdp * self.expert

    def describe(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.axes.items() if v > 1) or "1 device"
        pieces = f", loss in {self.loss_chunks} pieces" if self.loss_chunks > 1 else ""
        pipe = (f", virtual={self.virtual_stages}" if self.virtual_stages > 1 else "") + (
            ", stage_remat" if self.stage_remat else "")
        mesh += " +sp" if self.tensor_sequence else ""
        return f"{mesh}, mb={self.microbatches}{pipe}, remat={self.remat}{pieces}"


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    global_batch: int  # sequences per step
    seq_len: int
    platform: str  # the devices' (jax platform name: cpu, gpu, tpu): picks the attention kernel
    slice_devices: int = 0  # devices per slice where several are joined by the DCN (0: one slice)
    compute_bytes: int = field(init=False)  # activations and communicated params, in the model's dtype
    attention_kernel: str = field(init=False)  # xla, cudnn, flash or blockwise
    flash_attention: bool = field(init=False)  # no seq x seq scores kept for the backward pass
    flops_per_token: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "compute_bytes", 4 if self.model.dtype == "float32" else 2)
        kernel = attention_implementation(self.model, self.platform, self.seq_len)
        object.__setattr__(self, "attention_kernel", kernel)
        object.__setattr__(self, "flash_attention", kernel in ("cudnn", "flash", "blockwise"))
        object.__setattr__(self, "flops_per_token", train_flops_per_token(self.model, self.seq_len))

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


count_params = functools.lru_cache(maxsize=64)(param_count)  # the planner asks for the same model's often


def microbatch_tokens(c: Candidate, w: Workload) -> float:
    """Tokens one device holds in one microbatch."""
    return w.tokens / (c.batch_shards * c.microbatches * c.sequence)


def device_layers(c: Candidate, m: ModelConfig) -> list[tuple[ModelConfig, float]]:
    """The blocks each device runs, by kind (``layer_mix``): its stage's share of the stack; a mixture's
    dense first blocks (``moe_first_dense``) run before the pipeline, on every stage."""
    first = m.moe_first_dense if mixed_layers(m) else 0
    return [(kind, (n - first) / c.stages + first if not kind.moe_experts else n / c.stages)
            for kind, n in layer_mix(m)]
