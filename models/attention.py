"""Causal self-attention kernels, one per backend, all of q [b, length, heads, head_dim] and k, v
[b, length, kv_heads, head_dim] (grouped-query), with optional packed-document ``segments`` [b, length]:

- ``xla``: ``jax.nn.dot_product_attention``, which holds float32 seq x seq scores (and keeps them for
  the backward pass); ``cudnn``: the same call's fused flash attention on NVIDIA GPUs.
- ``flash``: the Pallas TPU splash-attention kernel, run on each device's block of the batch and heads.
- ``blockwise``: attention a block of keys at a time with a running softmax, in plain JAX: no
  seq x seq scores at any moment, forward or backward (each block's are recomputed), on any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from fax.models.config import ModelConfig, attention_implementation, tile
from fax.models.sharding import per_device, platform

MASKED = -1e30  # a finite "minus infinity": a block with every key hidden still has a defined maximum


# A layer's attention window (0: none): an int, or traced per row [b] where the layers alternate
# (global_every: each row knows how many layers it has passed, so no device asks another)
Window = int | jax.Array


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
           window: Window | None = None) -> jax.Array:
    """Causal attention by the kernel ``cfg.attention_impl`` means for these shapes on the devices the
    computation is laid out on, within ``window`` (default ``cfg.attention_window``): [b, length,
    heads, head_dim]."""
    kernel = attention_implementation(cfg, platform(), q.shape[1])
    if cfg.query_scale:  # the kernels divide by sqrt(head_dim): queries pre-scaled for query_scale's
        q = q * jnp.asarray((q.shape[-1] / cfg.query_scale) ** 0.5, q.dtype)
    window = cfg.attention_window if window is None else window
    if kernel == "flash":  # its window is fixed (``attention_implementation`` leaves it for alternating ones)
        return flash_attention(q, k, v, segments, cfg.attn_softcap, window)
    if kernel == "blockwise":  # a length no tile divides (an explicit setting): the whole sequence one block
        return blockwise_attention(q, k, v, segments, tile(q.shape[1]) or q.shape[1], cfg.attn_softcap, window)
    if cfg.attn_softcap:
        return softcapped_attention(q, k, v, segments, cfg.attn_softcap, window)
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
    if not isinstance(window, int):  # a traced window (alternating layers): a mask, in XLA's kernel
        seen = by_row(visible(jnp.arange(q.shape[1]), jnp.arange(q.shape[1]), window))[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=seen if mask is None else seen & mask, implementation="xla")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=kernel,
                                        local_window_size=(window - 1, 0) if window else None)


def visible(query_positions: jax.Array, key_positions: jax.Array, window: Window = 0) -> jax.Array:
    """Which keys each query sees [..., queries, keys]: those at or before it, and with a ``window``
    the window - 1 before it at most (``model.attention_window``)."""
    behind = query_positions[..., :, None] - key_positions[..., None, :]
    if isinstance(window, int):
        return (behind >= 0) & (behind < window) if window else behind >= 0
    window = window[:, None, None]  # per row: [b, queries, keys]
    return (behind >= 0) & ((window <= 0) | (behind < window))


def by_row(seen: jax.Array) -> jax.Array:
    """A ``visible`` mask with a leading axis of rows (1 where every row sees alike)."""
    return seen if seen.ndim == 3 else seen[None]


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)``: scores (or logits) bounded to (-cap, cap), unchanged near 0 (Gemma 2)."""
    return cap * jnp.tanh(x / cap) if cap else x


def softcapped_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                         cap: float, window: Window = 0) -> jax.Array:
    """XLA's attention with soft-capped scores (which ``jax.nn.dot_product_attention`` has no
    setting for): float32 seq x seq scores, [b, length, heads, head_dim]."""
    batch, length, heads, head_dim = q.shape
    groups = q.reshape(batch, length, k.shape[2], heads // k.shape[2], head_dim)
    scores = softcap(jnp.einsum("blkgd,bskd->bkgls", groups, k, preferred_element_type=jnp.float32)
                     * head_dim ** -0.5, cap)
    seen = by_row(visible(jnp.arange(length), jnp.arange(length), window))
    if segments is not None:
        seen = seen & (segments[:, :, None] == segments[:, None, :])
    weights = jax.nn.softmax(jnp.where(seen[:, None, None], scores, MASKED), axis=-1)
    return jnp.einsum("bkgls,bskd->blkgd", weights.astype(v.dtype), v).reshape(q.shape)


@functools.lru_cache(maxsize=32)
def splash_kernel(length: int, group: int, window: int, cap: float, interpret: bool) -> splash.SplashAttentionKernel:
    """The splash kernel of one kv head and its ``group`` query heads over sequences of ``length``: its
    block masks are worked out in NumPy when it is made (seconds at 32k tokens, a minute at 128k), so a
    process makes each once, however often steps are traced."""
    block = tile(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    seen = (splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0) if window
            else splash_mask.CausalMask((length, length)))
    return splash.make_splash_mqa(splash_mask.MultiHeadMask([seen] * group), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=cap or None, interpret=interpret)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None, cap: float = 0.0,
                    window: int = 0) -> jax.Array:
    """The Pallas TPU splash-attention kernel (block-sparse flash attention: the blocks above the diagonal
    are skipped; its backward pass reads one softmax statistic per query, where Pallas' older flash
    kernel broadcast three of them over 128-512 float32 lanes, buffers of [b, heads, length, 512]) on
    every device's share of the batch and kv heads, each kv head with its group of query heads (k and v
    not repeated), scores soft-capped at ``cap`` and keys limited to a ``window`` if given: [b, length,
    heads, head_dim]. Off a TPU it runs in Pallas' interpreter (tests)."""
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    segments = jnp.zeros((batch, length), jnp.int32) if segments is None else segments.astype(jnp.int32)

    def local(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
        b, _, h, _ = q.shape  # this device's rows and query heads
        kernel = splash_kernel(length, group, window, cap, platform() != "tpu")
        # [b, kv heads, group, length, head_dim]: the kernel takes one kv head and its query heads
        grouped = (q * jnp.asarray(head_dim ** -0.5, q.dtype)).reshape(b, length, h // group, group, head_dim)
        by_kv = jax.vmap(jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)),
                                  in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))
        out = by_kv(grouped.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segments)
        return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)

    rows = ("batch", None, "heads", None)
    kv_rows = ("batch", None, "kv_heads", None)
    return per_device(local, (rows, kv_rows, kv_rows, ("batch", None)), rows)(q, k, v, segments)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                        block: int, cap: float = 0.0, window: Window = 0) -> jax.Array:
    """Causal attention over ``block`` keys at a time with a running maximum and sum (the softmax
    computed online, as flash attention does), scores soft-capped at ``cap`` and keys limited to a
    ``window`` if given: [b, length, heads, head_dim]."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = (q.astype(jnp.float32) * head_dim ** -0.5).reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    segments = jnp.zeros((batch, length), jnp.int32) if segments is None else segments
    by_block = [x.reshape(batch, length // block, block, *x.shape[2:]).swapaxes(0, 1) for x in (k, v, segments)]
    starts = jnp.arange(0, length, block)
    positions = jnp.arange(length)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # the backward recomputes each block's scores
    def step(carry: tuple[jax.Array, jax.Array, jax.Array], block_in: tuple[jax.Array, ...]) -> tuple:
        top, total, out = carry
        keys, values, key_segments, start = block_in
        scores = softcap(jnp.einsum("blkgd,bskd->blkgs", groups, keys.astype(jnp.float32)), cap)
        seen = by_row(visible(positions, start + jnp.arange(block), window)) & (
            segments[:, :, None] == key_segments[:, None, :])  # [b, length, block]
        scores = jnp.where(seen[:, :, None, None, :], scores, MASKED)
        new_top = jnp.maximum(top, scores.max(-1))
        weights = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        out = out * rescale[..., None] + jnp.einsum("blkgs,bskd->blkgd", weights, values.astype(jnp.float32))
        return (new_top, total * rescale + weights.sum(-1), out), None

    shape = groups.shape[:-1]
    init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(groups.shape, jnp.float32))
    (_, total, out), _ = jax.lax.scan(step, init, (*by_block, starts))
    return (out / total[..., None]).reshape(q.shape).astype(q.dtype)
