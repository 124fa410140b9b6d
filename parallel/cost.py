"""Analytical cost of one training step under a candidate layout, term by term as fax's executor
runs it: compute (layer matmuls, the attention kernel, memory-bound work, the LM head and loss),
communication per mesh axis on the link it crosses, the pipeline bubble, memory per device. Small
pure functions; the figures they assume are named, each with its source.

Compute: a matmul runs at ``hardware.efficiency`` of peak (the device's measured ceiling for large
ones, less for short sides: the datasheet roofline of FLOPs against HBM bytes); memory-bound work
(norms, residual adds, activations, RoPE, XLA's attention scores, the float32 logits) moves its bytes
at the HBM bandwidth. Collectives are rings: all-gather / reduce-scatter of B bytes over n devices moves
(n-1)/n * B per device in n-1 steps, all-reduce both. An axis whose devices span hosts runs
hierarchically (a ring inside each host, then one across hosts with the host's share of the buffer);
on a TPU torus it has the links of every torus dimension it spans; across slices, the DCN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fax.models.config import (NAMED_REMAT, ModelConfig, active_d_ff, expert_param_count, named_widths,
                               routed_param_count)
from fax.parallel.config import DCN_AXES, MESH_AXES
from fax.parallel.hardware import ClusterSpec, Link, efficiency
from fax.parallel.layout import Candidate, Workload, count_params, device_layers, microbatch_tokens
from fax.parallel.memory import MEMORY_HEADROOM, PARAM_BYTES, dispatched_rows, memory, remat_bytes_per_token

# Share of the compute that XLA's asynchronous collectives can hide communication behind (the rest is
# exposed: the first layer's gather, the last layer's reduce-scatter, contention).
OVERLAP = 0.8
# The axes whose collectives run asynchronously beside the compute, by platform: fsdp's gathers and
# scatters and data's all-reduce everywhere; on TPUs the tensor axis's too (XLA's TPU async collective
# fusion and compute/collective overlap, on in MaxText's published runs); on GPUs the tensor axis's
# all-reduces sit between the matmuls that need them; XLA's CPU backend runs every collective in line.
OVERLAPPED_AXES = {"tpu": ("fsdp", "data", "tensor"), "gpu": ("fsdp", "data"), "cpu": ()}
# The attention kernels that skip the blocks no query sees (above the diagonal, behind a window): the
# fused ones (Pallas splash on TPUs, cuDNN on GPUs); XLA's and the blockwise one compute every block.
SKIPPING_KERNELS = ("flash", "cudnn")
# The attention kernels' matmul rate relative to the device's ceiling: a fused kernel interleaves the
# softmax with two head_dim-deep matmuls (FlashAttention-2 reports ~0.7 of a GEMM's rate on A100s).
ATTENTION_RATE = {"flash": 0.7, "cudnn": 0.7, "blockwise": 0.5, "xla": 0.7}
# XLA's attention moves each score per forward pass: float32 scores written and read by the softmax,
# 16-bit probabilities written and read by the weighted sum (bytes per score); its backward twice that.
SCORE_TRAFFIC = 12.0
# Elementwise bytes per token, layer and forward pass, in activation widths: two norms (read d, write d),
# two residual adds (read 2 d, write d), RoPE on queries and keys (read, write), the MLP's activation
# (read its inputs, write the product); ``elementwise_bytes`` counts them.
NORM_RESIDUAL_WIDTHS = 10
# The float32 logits, per logit: written by the head, read by the log-sum-exp and the loss, their
# gradient written and read by the head's backward.
LOGIT_TRAFFIC = 16.0
# A mixture's dispatch per forward pass, in dispatched rows' widths: the rows gathered in expert order
# (read, write), scattered back (read, write), and combined with the router's weights (read).
DISPATCH_WIDTHS = 5


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
    compute_terms: dict[str, float] = field(default_factory=dict)  # seconds by term (``compute_times``)
    exposed_by_axis: dict[str, float] = field(default_factory=dict)  # the exposed communication's seconds

    def breakdown(self) -> dict[str, float]:
        """Seconds of the step by what they are spent on: compute by term, the bubble, exposed
        communication by mesh axis (they add up to ``step_s``)."""
        return {**{f"{term} compute": t for term, t in self.compute_terms.items()}, "pipeline bubble": self.bubble_s,
                **{f"{axis} communication": t for axis, t in self.exposed_by_axis.items() if t}}

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def comm_share(self) -> float:
        return self.exposed_comm_s / self.step_s

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory_bytes, "comm_share": self.comm_share}


def ring_time(link: Link, participants: int, nbytes: float, passes: int = 1) -> float:
    """``passes`` ring passes (1: all-gather or reduce-scatter; 2: all-reduce) of a buffer of ``nbytes``."""
    if participants <= 1:
        return 0.0
    return passes * ((participants - 1) / participants * nbytes / link.bandwidth + (participants - 1) * link.latency)


def axis_span(axis: str, c: Candidate) -> tuple[int, int]:
    """(stride, extent) of one group of ``axis`` in the device order: the axes inside it (``MESH_AXES``
    order, tensor innermost) take consecutive devices."""
    inner = math.prod(c.axes[a] for a in MESH_AXES[MESH_AXES.index(axis) + 1:])
    return inner, inner * c.axes[axis]


def torus_links(stride: int, extent: int, torus: tuple[int, ...]) -> int:
    """How many dimensions of a TPU torus (chips filling the first dimension first) a group of devices
    ``stride`` apart over ``extent`` consecutive devices runs along: each brings its own ring."""
    covered, below = 0, 1
    for side in torus:
        covered += stride < below * side and extent > below
        below *= side
    return max(covered, 1)


def collective_time(axis: str, c: Candidate, cluster: ClusterSpec, nbytes: float, passes: int = 1) -> float:
    """Seconds of a ring collective of ``nbytes`` per device over ``axis`` on the links it crosses."""
    n = c.axes[axis]
    if n <= 1:
        return 0.0
    stride, extent = axis_span(axis, c)
    across = max(1, min(n, extent // cluster.slice_devices))  # slices the group spans (DCN)
    inside = n // across
    if cluster.torus:  # a TPU slice: ICI on every torus dimension the group covers
        within = Link(cluster.intra.bandwidth * torus_links(stride, min(extent, cluster.slice_devices),
                                                            cluster.torus), cluster.intra.latency)
        local = ring_time(within, inside, nbytes, passes)
    else:  # inside hosts over NVLink (or shared memory), across them over the network, hierarchically
        in_host = max(1, min(inside, cluster.devices_per_host // stride))
        local = ring_time(cluster.intra, in_host, nbytes, passes) + ring_time(
            cluster.inter, inside // in_host, nbytes / in_host, passes)
    return local + ring_time(cluster.dcn, across, nbytes / inside, passes)


def all_to_all_time(axis: str, c: Candidate, cluster: ClusterSpec, nbytes: float) -> float:
    """Seconds of an all-to-all over ``axis`` of a buffer of ``nbytes`` per device, of which (n-1)/n
    leaves the device. Across hosts on GPUs each device's share for other hosts crosses the network
    (nothing to aggregate, unlike a ring's); on a TPU torus the data travel a quarter of each ring on
    average, so a ring of r chips per dimension carries r / 8 of the buffer per link direction when
    r > 8 (the bisection limit), spread over the dimensions the group spans."""
    n = c.axes[axis]
    if n <= 1:
        return 0.0
    stride, extent = axis_span(axis, c)
    leaving = (n - 1) / n * nbytes
    if cluster.torus:
        links = torus_links(stride, min(extent, cluster.slice_devices), cluster.torus)
        ring = n ** (1 / links)
        return leaving * max(1.0, ring / 8) / (cluster.intra.bandwidth * links) + (n - 1) * cluster.intra.latency
    in_host = max(1, min(n, cluster.devices_per_host // stride))
    remote = (n - in_host) / n * nbytes
    return ((leaving - remote) / cluster.intra.bandwidth + remote / cluster.inter.bandwidth
            + (in_host - 1) * cluster.intra.latency + (n // in_host - 1) * cluster.inter.latency)


def dcn_shares(c: Candidate, slice_devices: int) -> dict[str, int] | None:
    """How many slices each axis spans (``parallel.dcn_<axis>``) when the devices, in ``MESH_AXES``
    order, fill one slice of ``slice_devices`` after another; None when that would split an axis
    unevenly or put one other than stage, data or fsdp across slices."""
    shares = {}
    for axis in MESH_AXES:
        stride, extent = axis_span(axis, c)
        if extent <= slice_devices or c.axes[axis] == 1:
            continue
        if slice_devices % stride and stride % slice_devices or axis not in DCN_AXES:
            return None
        shares[axis] = c.axes[axis] if stride >= slice_devices else extent // slice_devices
    return shares


def axis_link(axis: str, c: Candidate, cluster: ClusterSpec) -> Link:
    """The slowest link ``axis``'s groups cross: the host's own, the one between hosts, or the DCN."""
    _, extent = axis_span(axis, c)
    return (cluster.dcn if extent > cluster.slice_devices else
            cluster.intra if extent <= cluster.devices_per_host or cluster.torus else cluster.inter)


def layer_matmul_flops(m: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of the matmuls behind each tensor ``REMAT_NAMES`` tags (its producer)."""
    widths = named_widths(m)
    return {"query_proj": 2.0 * m.d_model * widths["query_proj"][0], "key_proj": 2.0 * m.d_model * widths["key_proj"][0],
            "value_proj": 2.0 * m.d_model * widths["value_proj"][0], "attention_out": 0.0,
            "out_proj": 2.0 * widths["attention_out"][0] * m.d_model,
            "mlpwi": 2.0 * m.d_model * widths["mlpwi"][0], "mlpwo": 2.0 * active_d_ff(m) * m.d_model}


def routed_flops(m: ModelConfig) -> float:
    """Forward FLOPs per token of a mixture's routed experts (those it is routed to): part of
    ``layer_matmul_flops``' MLP terms."""
    return 2.0 * m.moe_top_k * expert_param_count(m) if m.moe_experts else 0.0


def routed_load(c: Candidate, w: Workload) -> float:
    """The routed experts' work on the busiest device over the even share: a capacity dispatch
    computes its full buffers (the capacity factor); a dropless one waits for the busiest expert shard
    (``model.moe_imbalance``) when the experts are split over devices. XLA's CPU backend computes a
    grouped matmul as every local expert's for every row of its buffer."""
    m = w.model
    if m.moe_dispatch == "capacity":
        return m.moe_capacity_factor
    if w.platform == "cpu":
        return dispatched_rows(c, m) / m.moe_top_k * m.moe_experts / c.expert
    return m.moe_imbalance if c.expert > 1 else 1.0


def recomputed(remat: str, m: ModelConfig) -> dict[str, float]:
    """Extra forward passes the backward recomputes, of the layers' matmuls, their attention kernel and
    their memory-bound work. A policy that keeps named tensors recomputes the share of the matmul FLOPs
    whose outputs it does not keep (on device or host), and the attention unless it keeps its output."""
    if remat in NAMED_REMAT:
        flops = layer_matmul_flops(m)
        names = (*NAMED_REMAT[remat][0], *NAMED_REMAT[remat][1])
        return {"matmul": 1.0 - sum(flops[n] for n in names) / sum(flops.values()),
                "attention": 0.0 if "attention_out" in names else 1.0, "memory": 1.0}
    return {"none": {"matmul": 0.0, "attention": 0.0, "memory": 0.0},
            "dots_saveable": {"matmul": 0.0, "attention": 0.0, "memory": 1.0},
            "dots_with_no_batch_dims_saveable": {"matmul": 0.0, "attention": 1.0, "memory": 1.0},
            "full": {"matmul": 1.0, "attention": 1.0, "memory": 1.0}}[remat]


def remat_forwards(remat: str, m: ModelConfig) -> float:
    """The share of a layer's matmul FLOPs the backward recomputes (0: none, 1: a whole forward)."""
    return recomputed(remat, m)["matmul"]


def elementwise_bytes(m: ModelConfig, c: Candidate, b: float) -> float:
    """HBM bytes of a layer's memory-bound work per token and forward pass (``NORM_RESIDUAL_WIDTHS``):
    tensor parallelism splits the heads' and the MLP's share; the residual stream's only with sequence
    parallelism (``tensor_sequence``), else every tensor rank repeats it."""
    widths = named_widths(m)
    heads = 2 * (widths["query_proj"][0] + widths["key_proj"][0]) if m.position == "rope" else 0
    mlp = widths["mlpwi"][0] + active_d_ff(m)
    residual = NORM_RESIDUAL_WIDTHS * m.d_model / (c.tensor if c.tensor_sequence else 1)
    dispatch = DISPATCH_WIDTHS * dispatched_rows(c, m) * m.d_model if m.moe_experts else 0.0
    return (residual + dispatch + (heads + mlp) / c.tensor) * b


def attended_share(kernel: str, m: ModelConfig, seq_len: int) -> float:
    """The share of the full seq x seq square of scores a layer's attention kernel computes, averaged
    over the layers: a skipping kernel computes what the queries see, each min(position + 1, window)
    keys (half the square without a window); with ``global_every`` one layer in that many sees all."""
    if kernel not in SKIPPING_KERNELS:
        return 1.0
    window = min(m.attention_window or seq_len, seq_len) / seq_len
    local = window * (1 - window / 2)
    windowed = 1 - 1 / m.global_every if m.global_every else 1.0
    return windowed * local + (1 - windowed) * 0.5


def layer_times(c: Candidate, w: Workload, cluster: ClusterSpec, m: ModelConfig) -> dict[str, float]:
    """Seconds per token through one block of config ``m`` (a kind of ``layer_mix``), forward and
    backward with what the backward recomputes: its matmuls, its attention kernel, its memory-bound work."""
    d, b = cluster.device, w.compute_bytes
    passes = {term: 3.0 + extra + c.stage_remat for term, extra in recomputed(c.remat, m).items()}  # fwd + bwd = 3
    rows = microbatch_tokens(c, w)
    rate = d.peak_flops * efficiency(rows, m.d_model / c.tensor, d.knees, d.matmul_ceiling)
    routed = routed_flops(m)
    matmul_time = (sum(layer_matmul_flops(m).values()) - routed) / c.tensor / rate
    if routed:  # each expert's matmuls have its share of the rows: fine-grained experts' are short
        expert_rows = rows * m.moe_top_k * c.expert / m.moe_experts
        expert_rate = d.peak_flops * efficiency(expert_rows, m.d_model / c.tensor, d.knees, d.matmul_ceiling)
        matmul_time += (routed * routed_load(c, w) + 2.0 * m.d_model * m.moe_experts) / c.tensor / expert_rate
    kernel = w.attention_kernel
    attention_flops = 4.0 * w.seq_len * m.n_heads * m.kv_head_dim / c.tensor * attended_share(kernel, m, w.seq_len)
    memory_bytes = elementwise_bytes(m, c, b) + (
        SCORE_TRAFFIC * m.n_heads / c.tensor * w.seq_len if kernel == "xla" else 0.0)
    kept = remat_bytes_per_token(c.remat, m, c.tensor, b, c.tensor_sequence)  # written forward, read backward
    # A pipeline's tick loop keeps each tick's stack of layer activations, copied from the layer loop's
    # own stack (nested loops in the compiled step): written and read once more. With stage_remat the
    # tick loop keeps the stage's input, and the stack lives inside one tick's recomputation.
    stacks = 2 if c.stages > 1 and not c.stage_remat else 1
    return {"matmul": matmul_time * passes["matmul"],
            "attention": attention_flops * passes["attention"] / (d.peak_flops * d.matmul_ceiling * ATTENTION_RATE[kernel]),
            "memory": (memory_bytes * passes["memory"] + 2 * stacks * kept) / d.hbm_bandwidth}


def compute_times(c: Candidate, w: Workload, cluster: ClusterSpec) -> dict[str, float]:
    """Seconds per step of one device's compute, by term: the layers' matmuls, their attention kernel,
    their memory-bound work, and the LM head with its loss."""
    m, d = w.model, cluster.device
    tokens = w.tokens / (c.batch_shards * c.sequence)  # through this device's layers, all microbatches
    terms = {"matmul": 0.0, "attention": 0.0, "memory": 0.0}
    for kind, layers in device_layers(c, m):
        for term, seconds in layer_times(c, w, cluster, kind).items():
            terms[term] += tokens * layers * seconds
    # The head runs on each stage's share of the rows (spread), else on every stage for all of them.
    head_tokens = tokens / c.stages if c.stages > 1 and c.schedule.head_spread else tokens
    vocab = m.vocab_size / c.tensor
    head_rate = d.peak_flops * efficiency(microbatch_tokens(c, w), min(vocab, m.d_model), d.knees, d.matmul_ceiling)
    return {**terms, "head": head_tokens * (2.0 * m.d_model * vocab * (3 + (c.loss_chunks > 1)) / head_rate
                                            + vocab * LOGIT_TRAFFIC / d.hbm_bandwidth)}


def comm_times(c: Candidate, w: Workload, cluster: ClusterSpec) -> dict[str, float]:
    """Seconds of communication per step on each mesh axis (before any overlap)."""
    m, b = w.model, w.compute_bytes
    stage_params = count_params(m) / c.stages
    tokens = microbatch_tokens(c, w)
    kinds = device_layers(c, m)
    layers = sum(n for _, n in kinds)
    mixtures = sum(n for kind, n in kinds if kind.moe_experts)
    activation = tokens * m.d_model * b
    # The experts are gathered over fsdp alone; the rest of the params over fsdp and expert, as one
    # group (hierarchically: expert's ring inside, with its share of the buffer, then fsdp's).
    stage_routed = routed_param_count(m) * mixtures
    routed, dense = stage_routed / (c.expert * c.tensor), (stage_params - stage_routed) / c.tensor

    def gather(nbytes_per_param: float) -> float:
        return (collective_time("fsdp", c, cluster, (dense + routed) * nbytes_per_param)
                + collective_time("expert", c, cluster, dense / c.fsdp * nbytes_per_param))
    # all-reduces (or with sequence parallelism all-gather + reduce-scatter) per layer: 2 forward,
    # 2 backward, 2 more where the backward recomputes the projections
    tensor_collectives = 4 + (2 if recomputed(c.remat, m)["matmul"] > 0 else 0)
    kv = 2 * tokens * m.n_kv_heads * m.kv_head_dim / c.tensor * b * c.sequence
    stage_link = axis_link("stage", c, cluster)
    return {
        # fsdp: gather params for forward and backward, scatter gradients, for every microbatch
        "fsdp": c.microbatches * (2 * gather(b) + gather(PARAM_BYTES)),
        # data: the gradients' all-reduce, once: a pipeline's ticks and the data replicas' microbatches
        # (``accumulated_grads``) sum theirs apart; with fsdp or expert each microbatch's are reduce-scattered
        # over data too (fsdp's share of the bytes). A mixture's microbatches one after another, without
        # either, all-reduce their own (inside the loop over the layers, where XLA cannot move it out).
        "data": (c.microbatches if c.stages == 1 and m.moe_experts and c.fsdp * c.expert == 1 else 1) * collective_time(
            "data", c, cluster, stage_params * PARAM_BYTES / (c.fsdp * c.expert * c.tensor), passes=2),
        # a mixture's tokens to their experts' devices and back (all-to-all), forward and backward, and
        # again where the backward recomputes the layer
        "expert": c.microbatches * mixtures * tensor_collectives * all_to_all_time(
            "expert", c, cluster, tokens * dispatched_rows(c, m) * m.d_model * b) if m.moe_experts else 0.0,
        "tensor": c.microbatches * layers * tensor_collectives * collective_time("tensor", c, cluster, activation, 2),
        "sequence": c.microbatches * layers * 2 * collective_time("sequence", c, cluster, kv),
        # each tick every stage sends its state to the next, forward and backward
        "stage": 0.0 if c.stages == 1 else 2 * c.schedule.ticks * (
            activation / (c.tensor if c.tensor_sequence else 1) / stage_link.bandwidth + stage_link.send_latency) + (
            # interleaved: the stage's other chunks' params forward, their gradients backward (all-to-all)
            2 * (c.stages - 1) / c.stages * stage_params * PARAM_BYTES / (c.fsdp * c.tensor) / stage_link.bandwidth
            if c.virtual_stages > 1 else 0.0),
    }


def step_floor(c: Candidate, w: Workload, cluster: ClusterSpec) -> float:
    """Seconds per step that no larger microbatch count takes ``c``'s mesh and schedule under: its
    layers' compute (more microbatches only shorten the matmuls) and the collectives no overlap hides
    that run per microbatch on a microbatch's activations (their bytes per step stay, their latencies
    add up). The head is left out (a pipeline's spreads over the stages with more microbatches), and
    the stage's sends (fewer bytes each with more microbatches)."""
    terms, comm = compute_times(c, w, cluster), comm_times(c, w, cluster)
    exposed = sum(comm[axis] for axis in ("tensor", "sequence", "expert")
                  if axis not in OVERLAPPED_AXES[cluster.device.platform])
    return sum(terms.values()) - terms["head"] + exposed


def estimate(c: Candidate, w: Workload, cluster: ClusterSpec, memory_share: float = MEMORY_HEADROOM) -> Estimate:
    """``c``'s predicted step and memory; it fits where its memory is within ``memory_share`` of the device's."""
    devices = cluster.devices
    terms = compute_times(c, w, cluster)
    compute = sum(terms.values())
    stack = compute - terms["head"]
    bubble = stack * (c.stages - 1) / (c.virtual_stages * c.microbatches)  # S - 1 idle ticks of V M
    comm = comm_times(c, w, cluster)
    overlapped = OVERLAPPED_AXES[cluster.device.platform]
    hidden = sum(comm[axis] for axis in overlapped)
    # what compute cannot hide is shared among the overlapped axes by their time
    unhidden = max(0.0, hidden - OVERLAP * compute) / hidden if hidden else 0.0
    exposed = {axis: t * (unhidden if axis in overlapped else 1.0) for axis, t in comm.items()}
    step = compute + bubble + sum(exposed.values())
    mem = memory(c, w)
    flops = w.flops_per_token * w.tokens
    return Estimate(c, step, compute, bubble, comm, sum(exposed.values()), mem, w.tokens / step,
                    flops / (step * devices * cluster.device.peak_flops),
                    sum(mem.values()) <= memory_share * cluster.device.hbm_bytes, terms, exposed)
