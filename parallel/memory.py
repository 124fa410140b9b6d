"""Memory per device of a candidate layout: parameters, gradients, optimizer state, the activations
each remat policy keeps (as XLA keeps them in fax's step), the pipeline's per-tick states, gathered
weights, logits. Checked against XLA's TPU compiles of the planner's top layouts (``benchmarks/planner.py``)."""

from __future__ import annotations

import functools

from fax.models.config import NAMED_REMAT, ModelConfig, active_d_ff, block_param_count, named_widths, routed_param_count
from fax.parallel.layout import Candidate, Workload, count_params, device_layers, microbatch_tokens

MEMORY_HEADROOM = 0.9  # the share of device memory a plan may use: a margin for the model's error
OPTIMIZER_BYTES = 8.0  # Adam: two fp32 moments per parameter
# The optimizer step's float32 temporaries per parameter, by platform: on TPUs the new moments and
# parameters are computed in full before they replace the old (12-14 bytes per parameter in TPU compiles
# of fax's step); XLA's GPU compile of it updates in place (an H100 compile of Llama 1B showed none).
# They live after the backward pass has freed its activations: they add to the peak only past those.
UPDATE_BYTES = {"tpu": 12.0}
PARAM_BYTES = 4.0  # fp32 master parameters and gradients
SCORE_BYTES = 4.0  # a float32 attention score per head per key, kept unless the attention kernel is fused
KEPT_IN_FLOAT32 = 4.0  # bytes of the activations XLA keeps in float32 (see ``remat_bytes_per_token``)


@functools.lru_cache(maxsize=4096)  # the planner asks for the same few layouts' figures often
def remat_bytes_per_token(remat: str, m: ModelConfig, tensor: int, b: float, split_residual: bool = False) -> float:
    """Activation bytes a layer keeps on the device per token for the backward pass; with
    ``split_residual`` (sequence parallelism) the residual stream's tensors are split over ``tensor``
    too. Counted as XLA keeps them in fax's step (measured on TPU compiles, ``KEPT_IN_FLOAT32``):
    where nothing else stays on the device (full recomputation, offloading) the layer's input, in the
    compute dtype; otherwise 4 bytes per feature of it (with sequence parallelism XLA keeps it in
    bfloat16 beside the attention's out-projection output: the same bytes), and the dots policies add the
    outputs the backward needs of the projections (queries, keys, values, the MLP's input projections:
    the residual adds need neither out_proj's output nor mlpwo's), the named ones what they name, both
    in the compute dtype's ``b`` bytes; without remat autodiff keeps every matmul's input and the MLP activation's
    (both norms' outputs, the residual between the sublayers, queries, keys and values, the
    attention's output, the input projections and their product), in float32."""
    residual = tensor if split_residual else 1
    width = {name: w / (tensor if split else residual) for name, (w, split) in named_widths(m).items()}
    saved = NAMED_REMAT[remat][0] if remat in NAMED_REMAT else None  # the named tensors kept on the device
    if remat == "full" or saved == ():
        return m.d_model / residual * b
    layer_input = m.d_model / residual * KEPT_IN_FLOAT32
    if saved:
        return layer_input + sum(width[n] for n in saved) * b
    projections = width["query_proj"] + width["key_proj"] + width["value_proj"] + width["mlpwi"]
    if remat == "none":
        return layer_input + (3 * m.d_model / residual + projections + width["attention_out"]
                              + active_d_ff(m) / tensor) * KEPT_IN_FLOAT32
    return layer_input + projections * b


def dispatched_rows(c: Candidate, m: ModelConfig) -> float:
    """Rows a mixture's expert matmuls read per local token (``fax.models.moe``): its top-k; the
    dropless all-to-all's buffers hold every token going to each expert shard; capacity buffers the
    factor over the even share."""
    if m.moe_dispatch == "capacity":
        return m.moe_top_k * m.moe_capacity_factor
    return m.moe_top_k if c.expert == 1 else c.expert * min(m.moe_top_k, m.moe_experts // c.expert)


def memory(c: Candidate, w: Workload) -> dict[str, float]:
    """Bytes per device: parameters, gradients, optimizer state, activations, logits; a mixture of
    experts' dispatch buffers."""
    m, b = w.model, w.compute_bytes
    shard = c.stages * c.fsdp * c.expert * c.tensor  # the experts over expert, the rest over it as over fsdp
    params = count_params(m) / shard
    kinds = device_layers(c, m)
    mixtures = sum(n for kind, n in kinds if kind.moe_experts)
    tokens = microbatch_tokens(c, w)
    split = c.tensor if c.tensor_sequence else 1  # the residual stream's split (sequence parallelism)
    # what the device's blocks keep per token, all of them
    kept = sum(n * remat_bytes_per_token(c.remat, kind, c.tensor, b, c.tensor_sequence) for kind, n in kinds)
    if not w.flash_attention and c.remat in ("none", "dots_saveable"):  # XLA's attention: float32 scores kept
        kept += SCORE_BYTES * m.n_heads * w.seq_len / c.tensor * sum(n for _, n in kinds)
    # the backward's working set: a sublayer's activations at a time, recomputed (half a layer's)
    recompute = 0 if c.remat == "none" else max(
        remat_bytes_per_token("none", kind, c.tensor, b, c.tensor_sequence) for kind, _ in kinds) * tokens / 2
    # microbatches one after another: their running sum and the one being computed
    accumulating = c.stages == 1 and c.microbatches > 1
    found = {"params": params * PARAM_BYTES, "grads": params * PARAM_BYTES * (1 + accumulating),
             "optimizer": params * OPTIMIZER_BYTES}
    if c.stages == 1:
        found["activations"] = kept * tokens + recompute
    else:
        s = c.schedule
        # Each tick's stage input (kept by stage_remat for the recompute) and the last stage's output.
        ticks_kept = s.ticks * tokens * m.d_model / split * b * (1 + s.stage_remat)
        # GPipe keeps every tick's layer activations (a chunk of layers / V each); stage_remat one tick's.
        layer_ticks = 1 if s.stage_remat else s.ticks / s.virtual
        found["activations"] = kept * tokens * layer_ticks + recompute + ticks_kept
        if s.virtual > 1:  # the stage's chunks gathered from the layer-ordered params, and their gradients
            found["pipeline_params"] = 2 * params * PARAM_BYTES
    if m.moe_experts:  # a layer's rows sent to their experts and back, kept for the backward pass
        found["dispatch"] = 2 * dispatched_rows(c, m) * m.d_model * b * tokens * (mixtures if c.remat == "none" else 1)
    if c.fsdp * c.expert > 1:  # a layer's params gathered in the compute dtype, and the next one's (prefetched)
        def gathered(kind: ModelConfig) -> float:  # the experts are gathered over fsdp alone
            routed = routed_param_count(kind)
            return block_param_count(kind) - routed + (routed / c.expert if c.fsdp > 1 else 0)
        found["gathered"] = 2 * max(gathered(kind) for kind, _ in kinds) / c.tensor * b
    # float32 logits of one microbatch's rows per device at a time (a pipeline's head takes its rows in as
    # many pieces), a piece of the sequence at a time
    found["logits"] = tokens * m.vocab_size / c.tensor * 4 / c.loss_chunks
    update = params * UPDATE_BYTES.get(w.platform, 0.0) - sum(
        v for k, v in found.items() if k not in ("params", "grads", "optimizer"))
    if update > 0:  # past what the backward pass held
        found["update"] = update
    return found
