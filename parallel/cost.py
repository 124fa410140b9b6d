"""Analytical cost of one training step under a candidate layout: compute, communication per mesh
axis, pipeline bubble, memory per device. Small pure functions; the figures they assume are named.

Collectives are costed as rings: all-gather / reduce-scatter of a buffer of B bytes over n devices
moves (n-1)/n * B per device in n-1 steps; all-reduce is both. A mesh axis crosses hosts when the
axes inside it (``MESH_AXES`` order: tensor innermost) span more devices than a host has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fax.models.config import (NAMED_REMAT, ModelConfig, attention_implementation, named_widths, param_count,
                               train_flops_per_token)
from fax.parallel.hardware import ClusterSpec, Link, efficiency
from fax.parallel.config import MESH_AXES, Schedule

OVERLAP = 0.8  # fraction of compute that can hide fsdp/data collectives (XLA's async collectives)
MEMORY_HEADROOM = 0.9  # the share of device memory a plan may use (fragmentation, compiler temps)
# Extra forward passes the backward recomputes, for the policies not named by tensor (``remat_forwards``).
REMAT_FORWARDS = {"none": 0.0, "dots_saveable": 0.25, "dots_with_no_batch_dims_saveable": 0.25, "full": 1.0}
OPTIMIZER_BYTES = 8.0  # Adam: two fp32 moments per parameter
PARAM_BYTES = 4.0  # fp32 master parameters and gradients
SCORE_BYTES = 4.0  # a float32 attention score per head per key, kept unless the attention kernel is fused


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

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.stages, self.microbatches, self.virtual_stages, self.stage_remat)

    @property
    def axes(self) -> dict[str, int]:
        return {"stage": self.stages, "data": self.data, "fsdp": self.fsdp, "sequence": self.sequence,
                "tensor": self.tensor}

    def describe(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.axes.items() if v > 1) or "1 device"
        pieces = f", loss in {self.loss_chunks} pieces" if self.loss_chunks > 1 else ""
        pipe = (f", virtual={self.virtual_stages}" if self.virtual_stages > 1 else "") + (
            ", stage_remat" if self.stage_remat else "")
        return f"{mesh}, mb={self.microbatches}{pipe}, remat={self.remat}{pieces}"


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    step_s: float
    compute_s: float
    bubble_s: float
    comm_s: dict[str, float]  # by mesh axis, before overlap
    exposed_comm_s: float
    memory: dict[str, float]  # bytes per device by kind
    tokens_per_s: float
    mfu: float
    fits: bool

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def comm_share(self) -> float:
        return self.exposed_comm_s / self.step_s

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory_bytes, "comm_share": self.comm_share}


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    global_batch: int  # sequences per step
    seq_len: int
    platform: str  # the devices' (jax platform name: cpu, gpu, tpu): picks the attention kernel
    compute_bytes: int = field(init=False)  # activations and communicated params, in the model's dtype
    flash_attention: bool = field(init=False)  # no seq x seq scores kept for the backward pass
    flops_per_token: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "compute_bytes", 4 if self.model.dtype == "float32" else 2)
        kernel = attention_implementation(self.model, self.platform, self.seq_len)
        object.__setattr__(self, "flash_attention", kernel in ("cudnn", "flash", "blockwise"))
        object.__setattr__(self, "flops_per_token", train_flops_per_token(self.model, self.seq_len))

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


def ring_time(link: Link, participants: int, nbytes: float, passes: int = 1) -> float:
    """``passes`` ring passes (1: all-gather or reduce-scatter; 2: all-reduce) of a buffer of ``nbytes``."""
    if participants <= 1:
        return 0.0
    return passes * ((participants - 1) / participants * nbytes / link.bandwidth + (participants - 1) * link.latency)


def axis_links(c: Candidate, cluster: ClusterSpec) -> dict[str, Link]:
    """The link each mesh axis crosses: the host's own, or the one between hosts."""
    links, inner = {}, 1
    for axis in reversed(MESH_AXES):
        inner *= c.axes[axis]
        links[axis] = cluster.intra if inner <= cluster.devices_per_host else cluster.inter
    return links


def microbatch_tokens(c: Candidate, w: Workload) -> float:
    """Tokens one device holds in one microbatch."""
    return w.tokens / (c.data * c.fsdp * c.microbatches * c.sequence)


def layer_matmul_flops(m: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of the matmuls behind each tensor ``REMAT_NAMES`` tags (its producer)."""
    widths = named_widths(m)
    return {"query_proj": 2.0 * m.d_model * widths["query_proj"][0], "key_proj": 2.0 * m.d_model * widths["key_proj"][0],
            "value_proj": 2.0 * m.d_model * widths["value_proj"][0], "attention_out": 0.0,
            "out_proj": 2.0 * widths["attention_out"][0] * m.d_model,
            "mlpwi": 2.0 * m.d_model * widths["mlpwi"][0], "mlpwo": 2.0 * m.d_ff * m.d_model}


def remat_forwards(remat: str, m: ModelConfig) -> float:
    """Extra forward passes of the layers the backward recomputes: for a policy that keeps named
    tensors, the share of a layer's matmul FLOPs whose outputs it does not keep (on device or host)."""
    if remat not in NAMED_REMAT:
        return REMAT_FORWARDS[remat]
    flops = layer_matmul_flops(m)
    kept = sum(flops[name] for name in (*NAMED_REMAT[remat][0], *NAMED_REMAT[remat][1]))
    return 1.0 - kept / sum(flops.values())


def remat_bytes_per_token(remat: str, m: ModelConfig, tensor: int, b: float) -> float:
    """Activation bytes a layer keeps on the device per token for the backward pass (Megatron-LM's
    count for the unnamed policies, scaled to the compute dtype ``b`` bytes per value)."""
    if remat in NAMED_REMAT:  # the layer's input, and the named tensors kept on the device
        widths = named_widths(m)
        kept = sum(width / (tensor if split else 1) for width, split in (widths[n] for n in NAMED_REMAT[remat][0]))
        return (m.d_model + kept) * b
    return {"none": (10 * m.d_model + 24 * m.d_model / tensor) * b / 2,
            "dots_saveable": (4 * m.d_model + 12 * m.d_model / tensor) * b / 2,
            "dots_with_no_batch_dims_saveable": (4 * m.d_model + 12 * m.d_model / tensor) * b / 2,
            "full": m.d_model * b}[remat]


def memory(c: Candidate, w: Workload) -> dict[str, float]:
    """Bytes per device: parameters, gradients, optimizer state, activations, logits."""
    m, b = w.model, w.compute_bytes
    shard = c.stages * c.fsdp * c.tensor
    params = param_count(m) / shard
    layers = m.n_layers / c.stages
    tokens = microbatch_tokens(c, w)
    per_token_layer = remat_bytes_per_token(c.remat, m, c.tensor, b)
    if not (w.flash_attention or c.remat == "full"):  # XLA's attention keeps its float32 scores for the backward
        per_token_layer += SCORE_BYTES * m.n_heads * w.seq_len / c.tensor
    recompute = 0 if c.remat == "none" else (10 * m.d_model + 24 * m.d_model / c.tensor) * b / 2 * tokens
    found = {"params": params * PARAM_BYTES, "grads": params * PARAM_BYTES, "optimizer": params * OPTIMIZER_BYTES}
    if c.stages == 1:
        found["activations"] = per_token_layer * layers * tokens + recompute
    else:
        s = c.schedule
        # Each tick's stage input (kept by stage_remat for the recompute) and the last stage's output.
        ticks_kept = s.ticks * tokens * m.d_model * b * (1 + s.stage_remat)
        # GPipe keeps every tick's layer activations (a chunk of layers / V each); stage_remat one tick's.
        layer_ticks = 1 if s.stage_remat else s.ticks / s.virtual
        found["activations"] = per_token_layer * layers * tokens * layer_ticks + recompute + ticks_kept
        if s.virtual > 1:  # the stage's chunks gathered from the layer-ordered params, and their gradients
            found["pipeline_params"] = 2 * params * PARAM_BYTES
    # float32 logits of one microbatch's rows per device at a time (a pipeline's head takes its rows in as
    # many pieces), a piece of the sequence at a time
    found["logits"] = tokens * m.vocab_size / c.tensor * 4 / c.loss_chunks
    return found


def comm_times(c: Candidate, w: Workload, cluster: ClusterSpec) -> dict[str, float]:
    """Seconds of communication per step on each mesh axis (before any overlap)."""
    m, b, links = w.model, w.compute_bytes, axis_links(c, cluster)
    stage_params = param_count(m) / c.stages
    tokens = microbatch_tokens(c, w)
    layers = m.n_layers / c.stages
    activation = tokens * m.d_model * b
    tensor_collectives = 4 + (2 if c.remat == "full" else 0)  # all-reduces per layer: 2 forward, 2 backward
    kv = 2 * tokens * m.n_kv_heads * m.kv_head_dim / c.tensor * b * c.sequence
    return {
        # fsdp: gather params for forward and backward, scatter gradients, for every microbatch
        "fsdp": c.microbatches * (2 * ring_time(links["fsdp"], c.fsdp, stage_params * b / c.tensor)
                                  + ring_time(links["fsdp"], c.fsdp, stage_params * PARAM_BYTES / c.tensor)),
        "data": ring_time(links["data"], c.data, stage_params * PARAM_BYTES / (c.fsdp * c.tensor), passes=2),
        "tensor": c.microbatches * layers * tensor_collectives * ring_time(links["tensor"], c.tensor, activation, 2),
        "sequence": c.microbatches * layers * 2 * ring_time(links["sequence"], c.sequence, kv),
        "stage": 0.0 if c.stages == 1 else 2 * c.schedule.virtual * c.microbatches * (
            activation / links["stage"].bandwidth + links["stage"].latency) + (
            # interleaved: the stage's other chunks' params forward, their gradients backward (all-to-all)
            2 * (c.stages - 1) / c.stages * stage_params * PARAM_BYTES / (c.fsdp * c.tensor) / links["stage"].bandwidth
            if c.virtual_stages > 1 else 0.0),
    }


def estimate(c: Candidate, w: Workload, cluster: ClusterSpec) -> Estimate:
    m = w.model
    devices = cluster.devices
    flops = w.flops_per_token * w.tokens
    # a forward pass is a third of forward + backward; stage_remat runs the stack's forward once more
    recomputed = flops / 3 * (remat_forwards(c.remat, m) + c.stage_remat)
    head_flops = 6.0 * m.d_model * m.vocab_size * w.tokens
    head_repeats = 0.0 if c.schedule.head_spread else head_flops * (c.stages - 1)  # every stage runs the LM head
    head_repeats += head_flops / 3 * (c.loss_chunks > 1)  # pieces: the head's forward again
    rate = cluster.device.peak_flops * efficiency(microbatch_tokens(c, w), m.d_model / c.tensor,
                                                  cluster.device.matmul_knees)
    compute = (flops + recomputed + head_repeats) / devices / rate
    bubble = compute * (c.stages - 1) / (c.virtual_stages * c.microbatches)  # S - 1 idle ticks of V M
    comm = comm_times(c, w, cluster)
    hidden = comm["fsdp"] + comm["data"]
    exposed = max(0.0, hidden - OVERLAP * compute) + comm["tensor"] + comm["sequence"] + comm["stage"]
    step = compute + bubble + exposed
    mem = memory(c, w)
    return Estimate(c, step, compute, bubble, comm, exposed, mem, w.tokens / step,
                    flops / (step * devices * cluster.device.peak_flops),
                    sum(mem.values()) <= MEMORY_HEADROOM * cluster.device.hbm_bytes)
