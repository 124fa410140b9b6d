"""Transformer building blocks shared by every model family.

Each parameter carries its logical axis names in the ``out_sharding`` metadata; each key
activation is constrained by logical names through ``fax.models.sharding.constrain``, and tagged
with one of ``REMAT_NAMES`` where a remat policy may keep it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fax.models import moe
from fax.models.moe import activate  # every MLP's, the experts' too (moe cannot import this module)
from fax.models.attention import Window, attend, softcap, visible
from fax.models.config import GATED, ModelConfig
from fax.models.lora import Adapted
from fax.models.sharding import constrain, mesh_axes, per_device

RESIDUAL = ("batch", "residual_length", "embed")  # the stream between the blocks


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows [batch, length, embed] of a [vocab, embed] ``table`` at int ``ids`` [batch, length]. Where
    the vocabulary is split over devices, each looks up the ids that fall in its own rows (zeros for
    the rest) and the pieces are summed over the split. XLA, left to itself, may gather the whole table
    onto every device, build its gradient whole there and all-reduce it over every device (it does on
    TPUs where the rows go on split along the sequence over the vocabulary's axis)."""
    vocab_axes = mesh_axes("vocab")
    if not vocab_axes or set(vocab_axes) & {*mesh_axes("batch"), *mesh_axes("length")}:
        return constrain(table, ("vocab", None))[ids]  # whole along embed: the rows need no resharding

    def local(rows: jax.Array, ids: jax.Array) -> jax.Array:
        ids = ids - jax.lax.axis_index(vocab_axes) * rows.shape[0]
        mine = (ids >= 0) & (ids < rows.shape[0])
        found = jnp.where(mine[..., None], rows[jnp.where(mine, ids, 0)], jnp.zeros((), rows.dtype))
        return jax.lax.psum(found, vocab_axes)

    return per_device(local, [("vocab", None), ("batch", "length")], ("batch", "length", None))(table, ids)


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
          init: str | float) -> nnx.Param:
    """A float32 parameter: ``init`` is 'zeros', 'ones' or the std of a normal."""
    if init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = init * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes)


def linear(spec: str, x: jax.Array, w: jax.Array | Adapted) -> jax.Array:
    """``x`` times a weight (an einsum ``spec``) in x's dtype; a LoRA-adapted weight adds its update."""
    if isinstance(w, Adapted):
        return w.linear(spec, x)
    return jnp.einsum(spec, x, w.astype(x.dtype))


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


class Norm(nnx.Module):
    """LayerNorm (with bias) or RMSNorm over the last axis (``d_model``, or ``head_dim`` for a head
    norm: always RMSNorm); statistics in float32 whatever the compute dtype."""

    def __init__(self, cfg: ModelConfig, head: bool = False):
        self.kind, self.eps, self.plus_one = "rmsnorm" if head else cfg.norm, cfg.norm_eps, cfg.norm_plus_one
        width, axis = (cfg.kv_head_dim, "head_dim") if head else (cfg.d_model, "norm")
        self.scale = param(None, (width,), (axis,), "zeros" if cfg.norm_plus_one else "ones")
        self.bias = param(None, (width,), (axis,), "zeros") if self.kind == "layernorm" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.kind == "layernorm":
            h = h - h.mean(-1, keepdims=True)
        scale = self.scale[...] + 1.0 if self.plus_one else self.scale[...]
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps) * scale
        if self.bias is not None:
            h = h + self.bias[...]
        return h.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE's angular frequency for each pair of a head's features, scaled as ``cfg.rope_scaling`` says
    (float32, computed as transformers does, so that imported checkpoints give its logits)."""
    dim = cfg.kv_head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if cfg.rope_scaling == "linear":
        return (freqs / cfg.rope_factor).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        low, high, original = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_len
        wavelength = 2 * np.pi / freqs
        scaled = np.where(wavelength > original / low, freqs / cfg.rope_factor, freqs)
        blend = (original / wavelength - low) / (high - low)
        smoothed = (1 - blend) * scaled / cfg.rope_factor + blend * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return freqs.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """Rotary embedding over the last axis of x: [batch, length, heads, head_dim] (rotate-half form),
    at ``rope_frequencies``."""
    angles = positions[..., None].astype(jnp.float32) * freqs  # [batch?, length, half]
    if angles.ndim == 2:
        angles = angles[None]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def take_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """The tokens of ``x`` [b, length, ...] at ``index`` [b, n] along its length: [b, n, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class Attention(nnx.Module):
    """Multi-head / grouped-query causal self-attention via ``jax.nn.dot_product_attention``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.kv_head_dim, cfg.init_std
        self.cfg = cfg
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std / (2 * cfg.n_layers) ** 0.5)
        if cfg.use_bias or cfg.qkv_bias:
            self.q_bias = param(None, (h, hd), ("heads", "head_dim"), "zeros")
            self.k_bias = param(None, (kv, hd), ("kv_heads", "head_dim"), "zeros")
            self.v_bias = param(None, (kv, hd), ("kv_heads", "head_dim"), "zeros")
        if cfg.use_bias:
            self.out_bias = param(None, (d,), ("norm",), "zeros")
        if cfg.qk_norm:
            self.q_norm, self.k_norm = Norm(cfg, head=True), Norm(cfg, head=True)

    def _project(self, x: jax.Array, positions: jax.Array,
                 fused: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v of ``x``; with ``fused`` (``fused_qkv``) from one matmul."""
        cfg, dt = self.cfg, x.dtype
        q, k, v = (self._split_qkv(linear("bld,dkgh->blkgh", x, fused)) if fused is not None else
                   (linear("bld,dhk->blhk", x, w[...]) for w in (self.wq, self.wk, self.wv)))
        if cfg.use_bias or cfg.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        q, k, v = (checkpoint_name(t, name) for t, name in zip((q, k, v), ("query_proj", "key_proj", "value_proj")))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position == "rope":
            freqs = rope_frequencies(cfg)
            q, k = rope(q, positions, freqs), rope(k, positions, freqs)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def fused_qkv(self) -> jax.Array:
        """The q, k and v weights side by side [embed, kv_heads, group + 2, head_dim], grouped by kv
        head (so that a tensor-parallel split of the heads stays local). A decode step has few rows,
        for which one wide matmul is faster than three narrow ones. Inference builds it once, when
        it loads the params: inside a decode call the concatenation would be repeated at every token."""
        kv, hd = self.cfg.n_kv_heads, self.cfg.kv_head_dim
        return jnp.concatenate([self.wq[...].reshape(-1, kv, self.cfg.n_heads // kv, hd), self.wk[...][:, :, None],
                                self.wv[...][:, :, None]], axis=2)

    def _split_qkv(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v out of the fused projection [b, length, kv_heads, group + 2, head_dim]."""
        group = qkv.shape[3] - 2
        q = qkv[:, :, :, :group].reshape(*qkv.shape[:2], self.cfg.n_heads, qkv.shape[4])
        return q, qkv[:, :, :, group], qkv[:, :, :, group + 1]

    def _output(self, out: jax.Array) -> jax.Array:
        out = checkpoint_name(constrain(out, ("batch", "length", "heads", "head_dim")), "attention_out")
        y = linear("blhk,hkd->bld", out, self.wo[...])
        if self.cfg.use_bias:
            y = y + self.out_bias[...].astype(out.dtype)
        return checkpoint_name(constrain(y, RESIDUAL), "out_proj")

    def __call__(self, x: jax.Array, positions: jax.Array, documents: jax.Array | None = None,
                 window: Window | None = None) -> jax.Array:
        """Causal attention (within ``window``, default the model's); with ``documents`` ([b, length]
        segment ids) a token sees only the earlier tokens of its own document."""
        q, k, v = self._project(x, positions)
        return self._output(attend(self.cfg, q, k, v, documents, window))

    def cached(self, x: jax.Array, positions: jax.Array, cache: KVCache, fused: jax.Array,
               queries: jax.Array | None = None, window: int | None = None) -> tuple[jax.Array, KVCache]:
        """New tokens (``x`` [b, length], at ``positions`` [b, length]) write their keys and values
        into ``cache`` (b rows; positions past its end are dropped), then attend to everything
        cached at or before them. Attention reads the whole cache: its owner sizes it to the rows
        and positions in use, as a slice of a larger cache would be a copy of it at every token.
        The update is a scatter into the donated cache. ``fused``: this layer's ``fused_qkv``.
        With ``queries`` [b, n] (indices along ``length``) only those tokens attend, and only their
        outputs come back [b, n, embed]; every token's keys and values still go into the cache."""
        q, k, v = self._project(x, positions, fused)
        rows = jnp.arange(x.shape[0])[:, None]
        keys, values = (constrain(c.at[rows, :, positions].set(new.astype(c.dtype), mode="drop"), CACHE_AXES)
                        for c, new in zip(cache, (k, v)))
        if queries is not None:
            q, positions = take_tokens(q, queries), take_tokens(positions, queries)
        out = cached_attention(q.astype(keys.dtype), keys, values, positions, self.cfg.query_scale, self.cfg.attn_softcap,
                               self.cfg.attention_window if window is None else window)
        return self._output(out.astype(x.dtype)), (keys, values)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array, query_scale: float = 0.0,
                     cap: float = 0.0, window: int = 0) -> jax.Array:
    """Queries ``q`` [b, length, heads, head_dim] at ``positions`` [b, length] attend to the cached
    ``keys`` and ``values`` [b, kv_heads, slots, head_dim] at or before their positions (a query
    head to its group's kv head; within a ``window`` if given), scores scaled by ``query_scale``
    (0: head_dim) ** -0.5 and soft-capped at ``cap`` if given: [b, length, heads, head_dim]."""
    batch, length, heads, head_dim = q.shape
    groups = q.reshape(batch, length, keys.shape[1], heads // keys.shape[1], head_dim)
    scores = softcap(jnp.einsum("btkgd,bksd->bkgts", groups, keys, preferred_element_type=jnp.float32)
                     * (query_scale or head_dim) ** -0.5, cap)
    seen = visible(positions, jnp.arange(keys.shape[2]), window)  # [batch, length, slots]
    weights = jax.nn.softmax(jnp.where(seen[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", weights.astype(values.dtype), values)
    return out.reshape(batch, length, heads, head_dim)


KVCache = tuple[jax.Array, jax.Array]  # one layer's keys, values: [batch, kv_heads, slots, head_dim]
CACHE_AXES = ("batch", "kv_heads", None, "head_dim")  # sharded like the attention heads; a head's slots contiguous


class Mlp(nnx.Module):
    """GELU MLP (GPT-2), SwiGLU (Llama) or GeGLU (Gemma)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.cfg = cfg
        self.wi = param(rngs, (d, f), ("embed", "mlp"), std)
        if cfg.activation in GATED:
            self.wg = param(rngs, (d, f), ("embed", "mlp"), std)
        self.wo = param(rngs, (f, d), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5)
        if cfg.use_bias:
            self.in_bias = param(None, (f,), ("mlp",), "zeros")
            self.out_bias = param(None, (d,), ("norm",), "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, x.dtype
        h = checkpoint_name(linear("bld,df->blf", x, self.wi[...]), "mlpwi")
        if cfg.use_bias:
            h = h + self.in_bias[...].astype(dt)
        gate = checkpoint_name(linear("bld,df->blf", x, self.wg[...]), "mlpwi") if cfg.activation in GATED else None
        h = constrain(activate(cfg.activation, h, gate), ("batch", "length", "mlp"))
        y = linear("blf,fd->bld", h, self.wo[...])
        if cfg.use_bias:
            y = y + self.out_bias[...].astype(dt)
        return checkpoint_name(constrain(y, RESIDUAL), "mlpwo")


class MoeMlp(nnx.Module):
    """Router, routed experts and the optional shared expert of one block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, d, f, std = cfg.moe_experts, cfg.d_model, cfg.expert_d_ff, cfg.init_std
        self.cfg = cfg
        self.router = param(rngs, (d, e), ("embed", None), std)
        self.wi = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std)
        if cfg.activation in GATED:
            self.wg = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std)
        self.wo = param(rngs, (e, f, d), ("exp", "mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5)
        if cfg.moe_shared_d_ff:
            self.shared = Mlp(cfg.replace(d_ff=cfg.moe_shared_d_ff), rngs)
        if cfg.moe_shared_gate:
            self.shared_gate = param(rngs, (d, 1), ("embed", None), std)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, moe.RouterStats]:
        cfg = self.cfg
        logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), self.router[...])
        experts, weights, probs = moe.route(cfg, logits)
        gated = cfg.activation in GATED
        expert_weights = (self.wi[...], self.wg[...], self.wo[...]) if gated else (self.wi[...], self.wo[...])
        common = dict(activation=cfg.activation, expert_axes=mesh_axes("exp"), tensor_axes=mesh_axes("mlp"))
        if cfg.moe_dispatch == "capacity":
            capacity = moe.capacity_of(cfg, x.shape[1])
            choice = moe.capacity_slots(experts, cfg.moe_experts, capacity)
            dropped = jnp.mean(choice == cfg.moe_experts * capacity, axis=(1, 2), dtype=jnp.float32)
            run = functools.partial(moe.capacity_experts, n_experts=cfg.moe_experts, capacity=capacity, **common)
        else:
            choice, dropped = experts, jnp.zeros(x.shape[:1], jnp.float32)
            run = functools.partial(moe.dropless_experts, **common)
        weight_axes = [moe.EXPERT_IN] * (len(expert_weights) - 1) + [moe.EXPERT_OUT]
        y = per_device(run, [moe.TOKENS, moe.ROUTES, moe.ROUTES, *weight_axes], moe.TOKENS)(
            constrain(x, moe.TOKENS), choice, weights, *expert_weights)
        if cfg.moe_shared_d_ff:
            shared = self.shared(x)
            if cfg.moe_shared_gate:
                shared = shared * jax.nn.sigmoid(jnp.einsum("bld,do->blo", x, self.shared_gate[...].astype(x.dtype)))
            y = y + shared
        return checkpoint_name(constrain(y, RESIDUAL), "mlpwo"), moe.router_stats(logits, experts, probs, dropped)


class Block(nnx.Module):
    """Pre-norm transformer block; with ``post_norms`` each sublayer's output is normed as well (Gemma 2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm, self.attn = Norm(cfg), Attention(cfg, rngs)
        self.mlp_norm, self.mlp = Norm(cfg), (MoeMlp if cfg.moe_experts else Mlp)(cfg, rngs)
        if cfg.post_norms:
            self.post_attn_norm, self.post_mlp_norm = Norm(cfg), Norm(cfg)

    def _mlp(self, x: jax.Array) -> tuple[jax.Array, moe.RouterStats | None]:
        out, stats = self.mlp(self.mlp_norm(x)) if self.cfg.moe_experts else (self.mlp(self.mlp_norm(x)), None)
        return x + (self.post_mlp_norm(out) if self.cfg.post_norms else out), stats

    def _after_attention(self, out: jax.Array) -> jax.Array:
        return self.post_attn_norm(out) if self.cfg.post_norms else out

    def __call__(self, x: jax.Array, positions: jax.Array, documents: jax.Array | None = None,
                 window: Window | None = None) -> tuple[jax.Array, moe.RouterStats | None]:
        """The block's output, and its router's statistics (None: a dense block)."""
        x = x + self._after_attention(self.attn(self.attn_norm(x), positions, documents, window))
        return self._mlp(x)

    def cached(self, x: jax.Array, positions: jax.Array, cache: KVCache, fused: jax.Array,
               queries: jax.Array | None = None, window: int | None = None) -> tuple[jax.Array, KVCache]:
        h, cache = self.attn.cached(self.attn_norm(x), positions, cache, fused, queries, window)
        x = (x if queries is None else take_tokens(x, queries)) + self._after_attention(h)
        return self._mlp(x)[0], cache
