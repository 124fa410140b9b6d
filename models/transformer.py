"""The decoder-only language model, and its functional interface (params as plain dicts)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import CACHE_AXES, RESIDUAL, Block, KVCache, Norm, compute_dtype, param
from models.sharding import constrain

Params = dict[str, Any]

REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLM(nnx.Module):
    """Token + (learned) position embedding, a scanned stack of blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.position == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), cfg.init_std)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.n_layers,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        # Gather from a table whole along embed, so the lookup needs no resharding of its output.
        x = constrain(self.embed[...].astype(dt), ("vocab", None))[tokens]
        if cfg.position == "learned":
            x = x + self.pos_embed[...][positions].astype(dt)
        return constrain(x, RESIDUAL)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        head = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits = jnp.einsum("bld,dv->blv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (float32) for int tokens [batch, length]."""
        positions = jnp.arange(tokens.shape[1])
        graphdef, layer_params = nnx.split(self.blocks)

        def layer(h: jax.Array, params: Params) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, params)(h, positions), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICY[self.cfg.remat], prevent_cse=False)
        x, _ = jax.lax.scan(layer, self._embed(tokens, positions), layer_params)
        return self._logits(x)

    def cached(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               last: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Inference with a KV cache: ``tokens`` [batch, length] at per-row ``positions``, ``cache``
        stacked over layers ([layers, batch, slots, kv_heads, head_dim] keys and values). Returns the
        logits at index ``last[b]`` of each row (default: the last) and the updated cache."""
        graphdef, layer_params = nnx.split(self.blocks)

        def layer(h: jax.Array, xs: tuple[Params, jax.Array, jax.Array]) -> tuple[jax.Array, KVCache]:
            params, keys, values = xs
            return nnx.merge(graphdef, params).cached(h, positions, (keys, values))

        x, cache = jax.lax.scan(layer, self._embed(tokens, positions), (layer_params, *cache))
        if last is None:
            last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        return self._logits(x)[:, 0], cache


def empty_cache(cfg: ModelConfig, batch: int, slots: int) -> KVCache:
    """Zeroed keys and values for ``batch`` sequences of up to ``slots`` tokens, in the compute dtype."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.kv_head_dim)
    return jnp.zeros(shape, compute_dtype(cfg)), jnp.zeros(shape, compute_dtype(cfg))


def build(cfg: ModelConfig, seed: int = 0) -> DecoderLM:
    """A model with freshly initialised parameters (placed by the caller, if at all)."""
    with nnx.use_eager_sharding(False):
        return DecoderLM(cfg, nnx.Rngs(seed))


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only parameter state: no memory is allocated."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: DecoderLM(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def logical_axes(state: nnx.State) -> Params:
    """The logical axis names of every parameter, as a plain dict shaped like the params."""
    axes = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.to_pure_dict(axes)


def init_params(cfg: ModelConfig, seed: int) -> Params:
    """Fresh parameters as a plain dict of arrays (call under jit with out_shardings to shard)."""
    return nnx.to_pure_dict(nnx.state(build(cfg, seed), nnx.Param))


def apply(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens)


def apply_cached(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array, positions: jax.Array,
                 cache: KVCache, last: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    return nnx.merge(graphdef, params).cached(tokens, positions, cache, last)


CACHE_LOGICAL_AXES = ("layers", *CACHE_AXES)
