"""Mixture-of-experts feed-forward block: a router picks ``moe_top_k`` of ``moe_experts`` MLPs per
token, their outputs are summed with the router's weights, beside an optional always-on shared expert.

The routed experts run on each device's tokens (``per_device``), so that sorting tokens by expert
never crosses devices. Their weights [experts, embed, mlp] are split over the ``exp`` logical axis
(the ``expert`` mesh axis): a device's tokens reach the devices holding their experts by an
all-to-all over that axis and come back by another. ``mlp`` may be split over tensor as in a dense
MLP (the partial outputs are summed over it).

Two dispatches (``model.moe_dispatch``):

- ``dropless``: every routed token is computed. A device's assignments are sorted by expert and run
  through grouped matmuls (``grouped_matmul``); across expert shards each destination's buffer holds
  the worst case (every local token to it), as the shapes are static.
- ``capacity``: each expert takes at most ``capacity`` tokens of a sequence (first choices before
  second ones, then by position; GShard's priority); the rest pass by on the residual stream. The
  buffers [experts, capacity] are dense, so the matmuls are batched einsums.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from fax.models.config import GATED, ModelConfig
from fax.models.sharding import platform

TOKENS = ("batch", "length", "embed")  # the routed experts' input and output (the sequence whole over tensor)
ROUTES = ("batch", "length", None)  # each token's k choices
EXPERT_IN = ("exp", None, "mlp")  # [experts, embed, mlp] as the experts read it: gathered along embed
EXPERT_OUT = ("exp", "mlp", None)


class RouterStats(NamedTuple):
    """What the router did, per row [batch, ...], summed over the layers so far: it travels with the
    rows through the stack (and a pipeline), and the loss averages it."""

    balance: jax.Array  # [batch] the layer's load-balancing loss (the same for each row of a batch)
    z: jax.Array  # [batch] mean squared logsumexp of the router logits over the row's tokens
    load: jax.Array  # [batch, experts] share of the row's assignments each expert got
    dropped: jax.Array  # [batch] share of the row's assignments over capacity (0 when dropless)

    @staticmethod
    def zeros(batch: int, experts: int) -> RouterStats:
        row = jnp.zeros((batch,), jnp.float32)
        return RouterStats(row, row, jnp.zeros((batch, experts), jnp.float32), row)


def route(cfg: ModelConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(experts [..., k], their weights [..., k], the probabilities the balance loss reads [..., experts])
    of float32 router ``logits`` [..., experts]."""
    if cfg.moe_router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, cfg.moe_top_k)
    else:
        scores = jax.nn.sigmoid(logits)
        weights, experts = jax.lax.top_k(scores, cfg.moe_top_k)
        probs = scores / scores.sum(-1, keepdims=True)
    if cfg.moe_norm_topk:
        weights = weights / weights.sum(-1, keepdims=True)
    return experts, weights * cfg.moe_route_scale, probs


def router_stats(logits: jax.Array, experts: jax.Array, probs: jax.Array, dropped: jax.Array) -> RouterStats:
    """One layer's ``RouterStats`` of a batch [batch, length, ...]. The balance loss is Switch's:
    n_experts x sum over experts of (share of assignments) x (mean probability), 1 when even."""
    n = probs.shape[-1]
    load = jax.nn.one_hot(experts, n, dtype=jnp.float32).sum(-2).mean(1) / experts.shape[-1]  # [batch, experts]
    balance = n * jnp.sum(load.mean(0) * probs.mean((0, 1)))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2, axis=1)
    return RouterStats(jnp.broadcast_to(balance, z.shape), z, load, dropped)


def capacity_of(cfg: ModelConfig, length: int) -> int:
    """Slots per expert per sequence of ``length`` tokens: the capacity factor x the even share."""
    return max(1, math.ceil(cfg.moe_capacity_factor * length * cfg.moe_top_k / cfg.moe_experts))


def capacity_slots(experts: jax.Array, n_experts: int, capacity: int) -> jax.Array:
    """Each assignment's slot [batch, length, k] in its row's buffer of n_experts x capacity (expert
    e's slots at e x capacity + position in its queue), or n_experts x capacity where it is dropped.
    Queues fill with every first choice in token order, then every second choice, and so on."""
    b, length, k = experts.shape
    hits = jax.nn.one_hot(experts.swapaxes(1, 2).reshape(b, k * length), n_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(hits, axis=1) - 1) * hits, axis=-1).reshape(b, k, length).swapaxes(1, 2)
    return jnp.where(position < capacity, experts * capacity + position, n_experts * capacity)


def expert_mlp(activation: str, rows: jax.Array, weights: tuple[jax.Array, ...], matmul) -> jax.Array:
    """The experts' MLP of ``rows`` with ``matmul(x, w)`` (grouped or batched by expert); ``weights``:
    (in, out) or, gated, (in, gate, out), each [local experts, ...]."""
    w_in, w_out = weights[0], weights[-1]
    h = checkpoint_name(matmul(rows, w_in.astype(rows.dtype)), "mlpwi")
    gate = checkpoint_name(matmul(rows, weights[1].astype(rows.dtype)), "mlpwi") if activation in GATED else None
    return matmul(activate(activation, h, gate), w_out.astype(rows.dtype))


def activate(activation: str, h: jax.Array, gate: jax.Array | None) -> jax.Array:
    """An MLP's activation (``model.activation``) of its input projection ``h``: the tanh GELU of it, or
    SiLU (swiglu) or the tanh GELU (geglu) of the ``gate`` projection times it."""
    if activation not in GATED:
        return jax.nn.gelu(h, approximate=True)
    return (jax.nn.silu(gate) if activation == "swiglu" else jax.nn.gelu(gate, approximate=True)) * h


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``rows`` [m, k], sorted by group, each group's through its weights [groups, k, n]: [m, n], zero
    past the groups' rows. On TPUs the Pallas grouped-matmul kernels (their backward's weight gradient a
    transposed grouped matmul: XLA's TPU lowering of ``ragged_dot``'s computes it densely, every group
    for every row); elsewhere ``jax.lax.ragged_dot`` (XLA's CPU backend computes every group for every
    row, forward too)."""
    tiling = _tiling(rows.shape[0], rows.shape[1], weights.shape[-1])
    if platform() == "tpu" and tiling:
        out = megablox.gmm(rows, weights, group_sizes, preferred_element_type=rows.dtype, tiling=tiling)
    else:
        out = jax.lax.ragged_dot(rows, weights, group_sizes)
    return jnp.where((jnp.arange(rows.shape[0]) < jnp.sum(group_sizes))[:, None], out, 0)


def _tiling(m: int, k: int, n: int) -> tuple[int, int, int] | None:
    """The grouped-matmul kernel's tiles: rows in a block of up to 128 that divides them (None: none
    of at least 8 does), the other dimensions whole below 128, in tiles of 128 above."""
    rows = next((t for t in (128, 64, 32, 16, 8) if m % t == 0), None)
    return None if rows is None else (rows, min(k, 128), min(n, 128))


def _counts(ids: jax.Array, n: int) -> jax.Array:
    """How many of ``ids`` equal each of 0..n-1 (ids >= n, padding, are not counted)."""
    return jnp.bincount(ids, length=n).astype(jnp.int32)


def dropless_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, *expert_weights: jax.Array,
                     activation: str, expert_axes: tuple[str, ...], tensor_axes: tuple[str, ...]) -> jax.Array:
    """One device's tokens ``x`` [b, l, d] through their ``experts`` [b, l, k] (this device holds
    ``expert_weights``' first dimension of them), summed with ``weights``: every assignment computed."""
    b, length, d = x.shape
    k, local = experts.shape[-1], expert_weights[0].shape[0]
    shards = jax.lax.psum(1, expert_axes) if expert_axes else 1
    ids = experts.reshape(-1)
    order = jnp.argsort(ids, stable=True)
    ids = ids[order]
    rows = x.reshape(-1, d)[order // k]
    grouped = functools.partial(expert_mlp, activation, weights=expert_weights)
    if shards == 1:
        out = grouped(rows, matmul=functools.partial(grouped_matmul, group_sizes=_counts(ids, local)))
    else:
        # Assignments to each expert shard are contiguous in ``rows``: each goes to slot (its index
        # among that shard's) of the buffer sent there, sized for every token going there.
        shard, slots = ids // local, b * length * min(k, local)
        per_shard = _counts(shard, shards)
        start = jnp.cumsum(per_shard) - per_shard
        slot = jnp.arange(ids.shape[0]) - start[shard]
        send = jnp.zeros((shards, slots, d), x.dtype).at[shard, slot].set(rows)
        send_ids = jnp.full((shards, slots), local, jnp.int32).at[shard, slot].set(ids % local)
        exchange = functools.partial(jax.lax.all_to_all, axis_name=expert_axes, split_axis=0, concat_axis=0,
                                     tiled=True)
        received, received_ids = exchange(send).reshape(-1, d), exchange(send_ids).reshape(-1)
        by_expert = jnp.argsort(received_ids, stable=True)  # the padding (id ``local``) last
        matmul = functools.partial(grouped_matmul, group_sizes=_counts(received_ids, local))
        computed = grouped(received[by_expert], matmul=matmul)
        back = exchange(jnp.zeros_like(computed).at[by_expert].set(computed).reshape(shards, slots, d))
        out = back[shard, slot]
    y = jnp.zeros_like(out).at[order].set(out).reshape(b, length, k, d)
    y = jnp.einsum("blkd,blk->bld", y, weights.astype(y.dtype))
    return jax.lax.psum(y, tensor_axes) if tensor_axes else y


def capacity_experts(x: jax.Array, slots: jax.Array, weights: jax.Array, *expert_weights: jax.Array,
                     activation: str, n_experts: int, capacity: int, expert_axes: tuple[str, ...],
                     tensor_axes: tuple[str, ...]) -> jax.Array:
    """One device's rows ``x`` [b, l, d] into their experts' buffers at ``slots`` [b, l, k]
    (``capacity_slots``), batched through the experts, gathered back and summed with ``weights``."""
    b, length, d = x.shape
    k = slots.shape[-1]
    rows = jnp.arange(b)[:, None, None]
    buffers = jnp.zeros((b, n_experts * capacity, d), x.dtype).at[rows, slots].set(
        jnp.broadcast_to(x[:, :, None], (b, length, k, d)), mode="drop").reshape(b, n_experts, capacity, d)
    exchange = functools.partial(jax.lax.all_to_all, axis_name=expert_axes, tiled=True)
    if expert_axes:  # [b, experts, ...] -> [shards x b, local experts, ...] and back
        buffers = exchange(buffers, split_axis=1, concat_axis=0)
    out = expert_mlp(activation, buffers, expert_weights, matmul=lambda h, w: jnp.einsum("becd,edf->becf", h, w))
    if expert_axes:
        out = exchange(out, split_axis=0, concat_axis=1)
    gathered = out.reshape(b, n_experts * capacity, d).at[rows, slots].get(mode="fill", fill_value=0)
    y = jnp.einsum("blkd,blk->bld", gathered, weights.astype(x.dtype))
    return jax.lax.psum(y, tensor_axes) if tensor_axes else y

