"""The decoder-only language model, and its functional interface (params as plain dicts)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fax.models.attention import Window, softcap
from fax.models.config import NAMED_REMAT, ModelConfig, layer_window, mixed_layers, stack_units
from fax.models.layers import RESIDUAL, Block, KVCache, Norm, compute_dtype, lookup, param
from fax.models.moe import RouterStats
from fax.models.sharding import constrain

Params = dict[str, Any]
# What flows from layer to layer: the hidden states [batch, length, embed], and what else each row
# carries through the stack (every leaf's leading axis is the batch, so a pipeline can split it).
Carry = Any
LayerFn = Callable[[Carry, Any], Carry]  # (carry, one layer's params) -> carry
# (layer, the layers' params stacked on axis 0, carry) -> carry: how the stack of blocks runs.
RunLayers = Callable[[LayerFn, Any, Carry], Carry]


def scan_layers(layer: LayerFn, layer_params: Any, x: Carry) -> Carry:
    """One layer after another, compiled once (the default way to run the stack)."""
    return jax.lax.scan(lambda h, p: (layer(h, p), None), x, layer_params)[0]


def remat_policy(name: str) -> Callable:
    """What ``jax.checkpoint`` keeps of a layer under ``model.remat=name`` (not ``none``)."""
    policies = jax.checkpoint_policies
    if name in NAMED_REMAT:
        saved, offloaded = NAMED_REMAT[name]
        if not offloaded:
            return policies.save_only_these_names(*saved)
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
            offload_src="device", offload_dst="pinned_host")
    return {"full": policies.nothing_saveable, "dots_saveable": policies.dots_saveable,
            "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable}[name]


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, axis: str | None) -> Any:
    """``n`` modules from ``make``, their params stacked on a leading axis of logical name ``axis``."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n, transform_metadata={nnx.PARTITION_NAME: axis})
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)
    return build(rngs)


def run_stack(stack: nnx.Module, x: jax.Array, positions: jax.Array, documents: jax.Array | None,
              window: Window | None) -> jax.Array:
    """A stack of dense blocks (``stacked``) one after another."""
    graphdef, params = nnx.split(stack)
    return jax.lax.scan(lambda h, p: (nnx.merge(graphdef, p)(h, positions, documents, window)[0], None), x, params)[0]


class MixtureGroup(nnx.Module):
    """``moe_every`` - 1 dense blocks, then a mixture of experts': the entry of a stack whose mixtures
    alternate with dense blocks (one compiled body, which pipeline stages split like blocks)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dense = cfg.replace(moe_experts=0)
        self.dense = stacked(lambda r: Block(dense, r), cfg.moe_every - 1, rngs, None)
        self.moe = Block(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, documents: jax.Array | None = None,
                 window: Window | None = None) -> tuple[jax.Array, RouterStats]:
        return self.moe(run_stack(self.dense, x, positions, documents, window), positions, documents, window)


class LayerGroup(NamedTuple):
    """Blocks stored stacked [*dims, ...] at ``path`` of the params: the one at index (u, j) is layer
    first + u x step + j."""

    path: tuple[str, ...]
    dims: tuple[int, ...]
    first: int
    step: int
    moe: bool

    def layer(self, index: tuple[int, ...]) -> int:
        return self.first + index[0] * self.step + sum(index[1:])


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
    """Where each layer's block is stored: one stack [n_layers]; or, with dense blocks beside the
    mixtures, the dense first blocks' stack and the stack of mixture groups (its dense blocks [units,
    moe_every - 1], its mixtures [units])."""
    if not mixed_layers(cfg):
        return [LayerGroup(("blocks",), (cfg.n_layers,), 0, 1, bool(cfg.moe_experts))]
    first, every, units = cfg.moe_first_dense, cfg.moe_every, stack_units(cfg)
    groups = [LayerGroup(("dense_blocks",), (first,), 0, 1, False)] if first else []
    if every == 1:
        return groups + [LayerGroup(("blocks",), (units,), first, 1, True)]
    return groups + [LayerGroup(("blocks", "dense"), (units, every - 1), first, every, False),
                     LayerGroup(("blocks", "moe"), (units,), first + every - 1, every, True)]


class DecoderLM(nnx.Module):
    """Token + (learned) position embedding, a scanned stack of blocks, final norm, LM head. A mixture
    of experts with dense blocks too runs its dense first blocks (``moe_first_dense``) before the
    stack, whose entries are then mixture groups (``moe_every`` > 1) or mixture blocks."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.position == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), cfg.init_std)

        if cfg.moe_experts and cfg.moe_first_dense:  # not pipelined: every stage holds them
            dense = cfg.replace(moe_experts=0)
            self.dense_blocks = stacked(lambda r: Block(dense, r), cfg.moe_first_dense, rngs, None)
        unit = MixtureGroup if cfg.moe_experts and cfg.moe_every > 1 else Block
        self.blocks = stacked(lambda r: unit(cfg, r), stack_units(cfg), rngs, "layers")
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        x = lookup(self.embed[...].astype(dt), tokens)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model ** 0.5, dt)  # rounded to the compute dtype first, as Gemma does
        if cfg.position == "learned":
            x = x + self.pos_embed[...][positions].astype(dt)
        return constrain(x, RESIDUAL)

    def lm_head(self) -> jax.Array:
        """The output projection [embed, vocab]."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.head[...]

    def _logits(self, x: jax.Array, head: jax.Array | None = None) -> jax.Array:
        return head_logits(self.final_norm(x), self.lm_head() if head is None else head, self.cfg.logit_softcap)

    def hidden(self, tokens: jax.Array, run_layers: RunLayers = scan_layers,
               segments: jax.Array | None = None) -> tuple[jax.Array, RouterStats | None]:
        """The final (normed) hidden states [batch, length, embed] of int tokens [batch, length]:
        what the LM head projects, and a mixture of experts' router statistics summed over the layers
        (None: a dense model); ``run_layers`` may pipeline the blocks. With ``segments``
        ([batch, length] ints: which packed document of its row a token belongs to, non-decreasing)
        each document is read as if it stood alone: it attends only to itself and its positions
        count from its first token."""
        cfg = self.cfg
        positions = jnp.arange(tokens.shape[1]) if segments is None else document_positions(segments)

        def run(stack: nnx.Module, run_layers: RunLayers, carry: Carry) -> Carry:
            graphdef, layer_params = nnx.split(stack)

            def layer(carry: Carry, params: Params) -> Carry:
                # what travels with the rows (a pipeline splits the batch); ``depth``: the layers they passed
                h, documents, stats, depth = carry
                at = positions if documents is None else document_positions(documents)
                window = jnp.where((depth + 1) % cfg.global_every == 0, 0, cfg.attention_window) \
                    if cfg.global_every else None
                h, layer_stats = nnx.merge(graphdef, params)(h, at, documents, window)
                stats = stats if layer_stats is None else jax.tree.map(jnp.add, stats, layer_stats)
                return h, documents, stats, depth + 1

            if cfg.remat != "none":
                layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat), prevent_cse=False)
            return run_layers(layer, layer_params, carry)

        stats = RouterStats.zeros(tokens.shape[0], cfg.moe_experts) if cfg.moe_experts else None
        carry = (self._embed(tokens, positions), segments, stats, jnp.zeros(tokens.shape[:1], jnp.int32))
        if cfg.moe_experts and cfg.moe_first_dense:
            carry = run(self.dense_blocks, scan_layers, carry)
        h, _, stats, _ = run(self.blocks, run_layers, carry)
        return self.final_norm(h), stats

    def __call__(self, tokens: jax.Array, run_layers: RunLayers = scan_layers,
                 segments: jax.Array | None = None) -> jax.Array:
        """Logits (float32) for int tokens [batch, length]."""
        return head_logits(self.hidden(tokens, run_layers, segments)[0], self.lm_head(), self.cfg.logit_softcap)


def document_positions(documents: jax.Array) -> jax.Array:
    """Each token's position in its document (``segments``), counted from the document's first
    token in the row."""
    index = jnp.arange(documents.shape[1])
    first = jnp.concatenate([jnp.ones_like(documents[:, :1], bool), documents[:, 1:] != documents[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(first, index, 0), axis=1)


def head_logits(x: jax.Array, head: jax.Array, cap: float = 0.0) -> jax.Array:
    """Float32 logits [batch, length, vocab] of final hidden states ``x`` through the LM ``head``,
    soft-capped at ``cap`` if given (``model.logit_softcap``)."""
    # The matmul yields the compute dtype and only then float32 (for the softmax), so that the
    # gradient flows back in the compute dtype: a float32 cotangent would make both backward
    # matmuls of the head float32 (TF32 on a GPU: half the bf16 rate, a large share of a small model's step).
    logits = softcap(jnp.einsum("bld,dv->blv", x, head.astype(x.dtype)).astype(jnp.float32), cap)
    return constrain(logits, ("batch", "length", "vocab"))

def empty_cache(cfg: ModelConfig, batch: int, slots: int) -> list[KVCache]:
    """Zeroed keys and values, one pair per layer, for ``batch`` sequences of up to ``slots`` tokens."""
    shape = (batch, cfg.n_kv_heads, slots, cfg.kv_head_dim)
    return [(jnp.zeros(shape, compute_dtype(cfg)), jnp.zeros(shape, compute_dtype(cfg))) for _ in range(cfg.n_layers)]


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


def apply(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array, run_layers: RunLayers = scan_layers,
          segments: jax.Array | None = None) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens, run_layers, segments)


def apply_hidden(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array, run_layers: RunLayers = scan_layers,
                 segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array, RouterStats | None]:
    """The final hidden states, the LM head and the router statistics (``DecoderLM.hidden``), for a
    loss that projects the states a piece at a time (``head_logits``) instead of holding every
    position's logits at once."""
    model = nnx.merge(graphdef, params)
    hidden, stats = model.hidden(tokens, run_layers, segments)
    return hidden, model.lm_head(), stats


def subtree(tree: Any, path: tuple) -> Any:
    """The part of a nested tree (dicts, lists) at ``path``, its keys or indices one after another."""
    for key in path:
        tree = tree[key]
    return tree


def _replaced(tree: Params, path: tuple[str, ...], value: Any) -> Params:
    """A copy of ``tree`` with ``value`` at ``path`` (the dicts on the way copied, the rest shared)."""
    return {**tree, path[0]: value if len(path) == 1 else _replaced(tree[path[0]], path[1:], value)}


def _unstack(tree: Any, dims: tuple[int, ...]) -> Any:
    """Leaves [*dims, ...] as nested lists of trees (a list per axis)."""
    if not dims:
        return tree
    return [_unstack(jax.tree.map(lambda p, i=i: p[i], tree), dims[1:]) for i in range(dims[0])]


def _restack(tree: Any) -> Any:
    """Inverse of ``_unstack``, wherever it left lists."""
    if isinstance(tree, list):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[_restack(t) for t in tree])
    return {k: _restack(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def unstack_layers(cfg: ModelConfig, params: Params) -> Params:
    """The blocks' params as one tree per block (nested lists where they were stacked): inference
    indexes no stacked arrays (which would copy every layer's weights at every token)."""
    for group in layer_groups(cfg):
        params = _replaced(params, group.path, _unstack(subtree(params, group.path), group.dims))
    return params


def _merge_unstacked(graphdef: nnx.GraphDef, params: Params) -> tuple[DecoderLM, list[Block]]:
    """The model from params whose layers are unstacked (``unstack_layers``), and each layer's block in order."""
    # The stacked blocks are only there to rebuild the module; nothing reads them, so XLA drops them.
    model = nnx.merge(graphdef, _restack(params))
    blocks: list[Block] = [None] * model.cfg.n_layers  # type: ignore[list-item]
    for group in layer_groups(model.cfg):
        block, stored = nnx.graphdef(functools.reduce(getattr, group.path, model)), subtree(params, group.path)
        for index in np.ndindex(*group.dims):
            blocks[group.layer(index)] = nnx.merge(block, subtree(stored, index))
    return model, blocks


class ServingWeights(NamedTuple):
    """Weights inference derives from the params once, when it loads them, rather than in every
    call: the LM head [embed, vocab] (a tied embedding's transpose, laid out for the matmul: XLA:CPU
    multiplies by a transpose in place several times slower) and each layer's ``fused_qkv``. They take
    memory beside the params, as much as a decode call used to hold them in while it ran."""

    head: jax.Array
    qkv: list[jax.Array]


SERVING_AXES = ServingWeights(("embed", "vocab"), ("embed", "kv_heads", None, "head_dim"))  # qkv: every layer's


def serving_weights(graphdef: nnx.GraphDef, params: Params) -> ServingWeights:
    """The ``ServingWeights`` of unstacked ``params``."""
    model, blocks = _merge_unstacked(graphdef, params)
    return ServingWeights(model.lm_head(), [block.attn.fused_qkv() for block in blocks])


def apply_cached(graphdef: nnx.GraphDef, params: Params, weights: ServingWeights, tokens: jax.Array,
                 positions: jax.Array, cache: list[KVCache],
                 last: jax.Array | None = None) -> tuple[jax.Array, list[KVCache]]:
    """Inference with a KV cache: ``tokens`` [b, length] at ``positions`` go into ``cache`` (one
    (keys, values) per layer, [b, kv_heads, slots, head_dim]). ``params`` has its layers unstacked
    (``unstack_layers``); ``weights`` are its ``serving_weights``. Returns the logits at index
    ``last[b]`` of each row [b, vocab] (default: the last), or at the indices ``last[b, :]``
    [b, n, vocab], and the updated cache."""
    model, blocks = _merge_unstacked(graphdef, params)
    x = model._embed(tokens, positions)
    queries = None if last is None else last.reshape(len(last), -1)
    updated = []
    for i, (block, fused, layer_cache) in enumerate(zip(blocks, weights.qkv, cache)):
        # The last layer needs every token's keys and values, but its queries, attention output and MLP
        # only where the logits are read: in a prefill, the prompts' last tokens (a fifth of the FLOPs
        # of a 4-layer model's prefill).
        final = i == len(blocks) - 1
        x, layer_cache = block.cached(x, positions, layer_cache, fused, queries if final else None,
                                      layer_window(model.cfg, i))
        updated.append(layer_cache)
    logits = model._logits(x[:, -1:] if last is None else x, weights.head)
    return (logits if last is not None and last.ndim == 2 else logits[:, 0]), updated
