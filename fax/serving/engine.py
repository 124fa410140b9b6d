"""Inference from a run's sharded params: batched prefill and KV-cache decode with static shapes.

An ``Engine`` restores the params of a run directory (params only, onto any mesh; by default
tensor-parallel over the local devices) and compiles two functions per batch bucket: prefill of
right-padded prompts (one compile per prompt-length bucket) and decode (one per cache size, a
span bucket). The KV cache is sharded like the attention heads. Requests never trigger a compile
beyond those buckets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fax import models
from fax.config import Config, ConfigError
from fax.models.config import tensor_indivisible
from fax.interop.sources import source_config, source_params
from fax.params import param_layout
from fax.parallel import ParallelConfig, logical_sharding, make_mesh, replicated, with_activation_sharding
from fax.serving.sampling import GREEDY_PAD, MAX_LOGPROBS, SamplingParams, adjust, controls, sample
from fax.serving.text import generation_ends, run_tokenizer

TOKENS_PER_CALL = 8  # decode steps per device call: fewer host round trips, tokens arrive in bursts
# XLA:CPU's YNN matmul fusions run decode's skinny products (one token per sequence against each weight,
# a memory-bound read of the weights) slower than its own dot emitter at larger batches.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# The share of a device's memory the params and the largest KV cache may take (the rest: prefill's
# activations and XLA's scratch).
SERVING_MEMORY_SHARE = 0.9


def _prefill(cfg: models.ModelConfig, graphdef: nnx.GraphDef, params: Any, weights: models.ServingWeights,
             tokens: jax.Array, lengths: jax.Array, *controls: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    """Right-padded prompts through the model into a cache of their own: the first sampled
    tokens, that cache and the next-token logits."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    logits, fresh = models.apply_cached(graphdef, params, weights, tokens, positions,
                                        models.empty_cache(cfg, batch, length), last=lengths - 1)
    adjusted = adjust(logits, jnp.zeros(logits.shape, jnp.int32), *controls[4:])  # nothing generated yet
    return sample(adjusted, controls[0], jnp.zeros_like(lengths), *controls[1:4]), fresh, logits


def _score(cfg: models.ModelConfig, graphdef: nnx.GraphDef, params: Any, weights: models.ServingWeights,
           tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each token's log-probability given those before it [b, length - 1], under the model's own
    distribution (no temperature, no filters), and the most likely tokens at each of those
    positions: ids and log-probabilities [b, length - 1, MAX_LOGPROBS]."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    logits, _ = models.apply_cached(graphdef, params, weights, tokens, positions,
                                    models.empty_cache(cfg, batch, length), last=positions[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    top_logp, top_ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, cfg.vocab_size))
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], top_ids, top_logp


def _insert(cache: Any, fresh: Any, rows: jax.Array) -> Any:
    """A prefilled cache copied into ``rows`` of the serving cache (out-of-range rows: padding, dropped)."""
    return jax.tree.map(lambda c, f: c.at[rows, :, :f.shape[2]].set(f, mode="drop"), cache, fresh)


def _count_first(counts: jax.Array, rows: jax.Array, first: jax.Array) -> jax.Array:
    """``rows`` of the generated-token counts restarted with their first token (out-of-range rows:
    padding, dropped)."""
    return counts.at[rows].set(jax.nn.one_hot(first, counts.shape[1], dtype=counts.dtype), mode="drop")


def _cut_or_pad(x: jax.Array, shape: tuple[int | None, ...]) -> jax.Array:
    """``x`` cut to ``shape``, or zero-padded at the ends up to it (None: an axis as it is)."""
    x = x[tuple(slice(n) for n in shape)]
    return jnp.pad(x, [(0, 0 if n is None else n - size) for n, size in zip(shape, x.shape)])


def _resize(rows: int, slots: int, layer: models.KVCache) -> models.KVCache:
    """One layer's cache with ``rows`` rows and ``slots`` slots."""
    return tuple(_cut_or_pad(c, (rows, None, slots, None)) for c in layer)


def _resize_counts(rows: int, counts: jax.Array) -> jax.Array:
    """The generated-token counts of ``rows`` rows."""
    return _cut_or_pad(counts, (rows, None))


def _decode(graphdef: nnx.GraphDef, tokens_per_call: int, params: Any,
            weights: models.ServingWeights, cache: Any, counts: jax.Array, tokens: jax.Array, positions: jax.Array,
            steps: jax.Array, *controls: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    """``tokens_per_call`` tokens [rows, n] for each cache row, each fed back for the next, in one
    device call; the rows' counts of generated tokens [rows, vocab] follow them."""
    rows = jnp.arange(tokens.shape[0])
    Carry = tuple[jax.Array, Any, jax.Array]  # the last tokens, the cache, the counts

    def one(carry: Carry, i: jax.Array) -> tuple[Carry, jax.Array]:
        token, cache, counts = carry
        logits, cache = models.apply_cached(graphdef, params, weights, token[:, None], (positions + i)[:, None], cache)
        token = sample(adjust(logits, counts, *controls[4:]), controls[0], steps + i, *controls[1:4])
        return (token, cache, counts.at[rows, token].add(1)), token

    (_, cache, counts), out = jax.lax.scan(one, (tokens, cache, counts), jnp.arange(tokens_per_call))
    return out.T, cache, counts


def buckets(limit: int, smallest: int, halfway: bool = False) -> tuple[int, ...]:
    """``smallest`` times powers of two up to ``limit`` (``limit`` itself always included); with
    ``halfway`` also the sizes 1.5 times each (a finer ladder: less padding, more compiles)."""
    powers = [smallest * 2 ** i for i in range(max(0, math.ceil(math.log2(max(limit / smallest, 1)))))]
    sizes = powers + [3 * s // 2 for s in powers] * halfway
    return tuple(sorted({s for s in sizes if s < limit} | {limit}))


def bucket(sizes: Sequence[int], n: int) -> int:
    return next(b for b in sizes if b >= n)


def serving_mesh(cfg: models.ModelConfig, devices: Sequence[jax.Device], tensor: int = 0) -> jax.sharding.Mesh:
    """Tensor parallelism over the largest number of ``devices`` that divides the heads, kv heads,
    MLP and vocabulary (or exactly ``tensor`` devices)."""
    if not tensor:
        tensor = max(t for t in range(1, len(devices) + 1) if not tensor_indivisible(cfg, t))
    return make_mesh(ParallelConfig(fsdp=1, tensor=tensor), list(devices)[:tensor])


def device_memory_bytes(device: jax.Device) -> int | None:
    """What the device can allocate (None where it does not say, as on the CPU)."""
    stats = device.memory_stats()
    return stats.get("bytes_limit") if stats else None



class Engine:
    """The device side of generation: params, one KV cache (a row per request), and compiled
    functions whose shapes all come from a few static buckets. The cache holds as many rows as
    the rows in use need (a batch bucket) and as many slots as the furthest position in use needs
    (a span bucket), resized between calls when either changes: attention then reads the whole
    cache, where a slice of a larger one would be a copy at every token. A ``Batcher`` decides
    what runs; every process of a multi-host engine receives the same calls."""

    def __init__(self, cfg: models.ModelConfig, params: Any, mesh: jax.sharding.Mesh, max_batch: int = 8,
                 end_ids: Sequence[int] = (), tokens_per_call: int = TOKENS_PER_CALL):
        self.cfg, self.mesh = cfg, mesh
        self.end_ids = tuple(end_ids)  # tokens that end a request (not emitted): end of text, end of turn
        self.step: int | None = None  # the checkpoint step the params came from, if any
        self.graphdef, _, _, shardings = param_layout(Config(model=cfg), mesh)  # merged weights: no adapters
        self.params = models.unstack_layers(cfg, jax.device_put(params, shardings))
        head, qkv = (logical_sharding(axes, mesh) for axes in models.SERVING_AXES)
        self.weights = jax.jit(functools.partial(models.serving_weights, self.graphdef),
                               out_shardings=models.ServingWeights(head, [qkv] * cfg.n_layers))(self.params)
        self.batch_buckets = buckets(max_batch, 1)
        self.length_buckets = buckets(cfg.max_seq_len, min(16, cfg.max_seq_len))
        # The cache's sizes: a finer ladder, since attention's cost is the slots'.
        self.span_buckets = buckets(cfg.max_seq_len, min(16, cfg.max_seq_len), halfway=True)
        self.cache_sharding = logical_sharding(models.CACHE_AXES, mesh)  # every layer's keys and values
        self._check_memory()
        self.cache: Any = None
        self._replicated = replicated(mesh)
        self._prefill = jax.jit(with_activation_sharding(functools.partial(_prefill, cfg, self.graphdef), mesh),
                                out_shardings=(self._replicated, self.cache_sharding, self._replicated))
        self._score = jax.jit(with_activation_sharding(functools.partial(_score, cfg, self.graphdef), mesh),
                              out_shardings=self._replicated)
        self._insert = jax.jit(_insert, out_shardings=self.cache_sharding, donate_argnums=(0,))
        self._resize = jax.jit(_resize, static_argnums=(0, 1), out_shardings=self.cache_sharding)
        self._empty_cache = jax.jit(functools.partial(models.empty_cache, cfg), static_argnums=(0, 1),
                                    out_shardings=self.cache_sharding)
        self.counts: Any = None  # each cache row's count of every token it generated [rows, vocab]
        self._count_first = jax.jit(_count_first, out_shardings=self._replicated, donate_argnums=(0,))
        self._resize_counts = jax.jit(_resize_counts, static_argnums=(0,), out_shardings=self._replicated)
        self._empty_counts = jax.jit(lambda rows: jnp.zeros((rows, cfg.vocab_size), jnp.int32), static_argnums=(0,),
                                     out_shardings=self._replicated)
        self.tokens_per_call = tokens_per_call
        cpu = mesh.devices.flat[0].platform == "cpu"
        self._decode = jax.jit(with_activation_sharding(functools.partial(_decode, self.graphdef, tokens_per_call), mesh),
                               out_shardings=(self._replicated, self.cache_sharding, self._replicated),
                               donate_argnums=(2, 3),
                               compiler_options=CPU_DECODE_OPTIONS if cpu else None)

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def _check_memory(self) -> None:
        """The cache grows with the requests: check now that it fits beside the params and their
        serving weights at its largest (max_batch rows, the whole context), not when a request needs it."""
        limit = device_memory_bytes(self.mesh.local_devices[0])  # one of this process's: others cannot say
        if limit is None:
            return
        cfg = self.cfg
        params = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((self.params, self.weights)))
        largest = jax.eval_shape(functools.partial(models.empty_cache, cfg, self.max_batch, cfg.max_seq_len))
        cache = sum(math.prod(self.cache_sharding.shard_shape(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves(largest))
        if params + cache > SERVING_MEMORY_SHARE * limit:
            mib = 2 ** 20
            raise ConfigError(
                f"serving needs {(params + cache) / mib:,.1f} MiB per device (params {params / mib:,.1f}, KV cache of "
                f"max_batch={self.max_batch} x {cfg.max_seq_len} positions {cache / mib:,.1f}), more than "
                f"{SERVING_MEMORY_SHARE:.0%} of the device's {limit / mib:,.1f} MiB; lower max_batch (--max-batch) "
                f"or serve over more devices")

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, devices: Sequence[jax.Device] | None = None, tensor: int = 0,
                     step: int | None = None, max_batch: int = 8, end_ids: Sequence[int] | None = None) -> Engine:
        """The params of a run directory's latest (or ``step``'s) checkpoint, or of a Hugging Face
        folder (``hf:DIR``), restored onto this mesh. ``end_ids``: ``generation_ends`` of the run's
        tokenizer, from a caller that holds it already (default: the tokenizer is read here)."""
        config = source_config(run_dir)
        mesh = serving_mesh(config.model, jax.devices() if devices is None else devices, tensor)
        params, step = source_params(config, mesh, step)
        if end_ids is None:
            end_ids = generation_ends(run_tokenizer(config))
        engine = cls(config.model, params, mesh, max_batch, end_ids)
        engine.step = step
        return engine

    @property
    def rows(self) -> int:
        """How many sequences the cache holds now."""
        return self.cache[0][0].shape[0]

    @property
    def slots(self) -> int:
        """How many positions the cache holds now."""
        return self.cache[0][0].shape[2]

    def reset(self) -> None:
        """A fresh, empty cache, of the smallest size (calls grow it to what they need)."""
        self.cache = None  # free the old cache before allocating the new one
        self.cache = self._empty_cache(self.batch_buckets[0], self.span_buckets[0])
        self.counts = self._empty_counts(self.batch_buckets[0])

    def _fit(self, rows: int, positions: int) -> None:
        """Size the cache to the buckets that hold ``rows`` rows and ``positions`` positions."""
        shape = bucket(self.batch_buckets, rows), bucket(self.span_buckets, min(positions, self.cfg.max_seq_len))
        if shape[0] != self.rows:
            self.counts = self._resize_counts(shape[0], self.counts)
        if shape != (self.rows, self.slots):
            for i in range(len(self.cache)):  # a layer at a time: never the old and the new cache both whole
                self.cache[i] = self._resize(*shape, self.cache[i])

    def warm_up(self) -> None:
        """Compile the prefill of every batch and prompt-length bucket and the decode of every cache
        shape now, by running each once on a dummy batch: the first request to reach a new shape would
        otherwise stall every running request for the compile (seconds each on a CPU, 35 decode shapes
        at max_batch 16). Requests with logit biases compile their own prefill and decode on first use."""
        for rows in self.batch_buckets:
            for length in self.length_buckets:
                self.reset()
                self.prefill(range(rows), [[0] * length] * rows, [GREEDY_PAD] * rows)
            for slots in self.span_buckets:
                self.decode(np.zeros(rows, np.int32), np.full(rows, max(slots - self.tokens_per_call, 0)),
                            np.zeros(rows, np.int32), [GREEDY_PAD] * rows)
        self.reset()

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                sampling: Sequence[SamplingParams]) -> np.ndarray:
        """Write the prompts into cache ``rows``; their first sampled tokens."""
        return self._prefill_rows(rows, prompts, sampling)[0]

    def _prefill_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                      sampling: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray]:
        """The prompts' first sampled tokens and next-token logits, their cache written into ``rows``."""
        tokens, lengths = self._pack(prompts)
        # Grow only: the rows of other requests may be under way.
        self._fit(max(self.rows, max(rows) + 1), max(self.slots, tokens.shape[1]))
        pad = len(lengths) - len(prompts)
        targets = np.array([*rows, *[self.rows] * pad], np.int32)  # padding points past the cache
        first, fresh, logits = self._prefill(self.params, self.weights, *self._put(
            tokens, lengths, *controls([*sampling, *[GREEDY_PAD] * pad])))
        self.cache = self._insert(self.cache, fresh, *self._put(targets))
        self.counts = self._count_first(self.counts, *self._put(targets), first)
        return np.asarray(first)[:len(prompts)], np.asarray(logits)[:len(prompts)]

    def decode(self, tokens: np.ndarray, positions: np.ndarray, steps: np.ndarray,
               sampling: Sequence[SamplingParams]) -> np.ndarray:
        """Feed a token to each of the first ``len(tokens)`` cache rows; the next tokens of each [rows, n]."""
        self._fit(len(tokens), int(positions.max()) + self.tokens_per_call)  # the rows past len(tokens) are free
        out, self.cache, self.counts = self._decode(self.params, self.weights, self.cache, self.counts, *self._put(
            tokens.astype(np.int32), positions.astype(np.int32), steps.astype(np.int32), *controls(sampling)))
        return np.asarray(out)

    def score(self, tokens: Sequence[int]) -> tuple[np.ndarray, ...]:
        """``_score`` of one sequence: [n - 1] and twice [n - 1, MAX_LOGPROBS]. A forward pass of its
        own, the cache untouched: a request's tokens are scored once it is done."""
        if not 1 <= len(tokens) <= self.cfg.max_seq_len:
            raise ValueError(f"can score 1 to {self.cfg.max_seq_len} tokens (the model's context), got {len(tokens)}")
        padded, _ = self._pack([tokens])
        return tuple(np.asarray(x)[0, :len(tokens) - 1] for x in self._score(self.params, self.weights, *self._put(padded)))

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The next-token logits after each prompt (for checks against the training forward pass)."""
        self.reset()
        logits = self._prefill_rows(range(len(prompts)), prompts, [GREEDY_PAD] * len(prompts))[1]
        self.cache = None
        return logits

    def _pack(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts right-padded into the smallest batch and length buckets that hold them."""
        batch = bucket(self.batch_buckets, len(prompts))
        lengths = np.array([len(p) for p in prompts] + [1] * (batch - len(prompts)), np.int32)
        tokens = np.zeros((batch, bucket(self.length_buckets, lengths.max())), np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)] = ids
        return tokens, lengths

    def _put(self, *arrays: np.ndarray) -> tuple[jax.Array | np.ndarray, ...]:
        """Host arrays as replicated global arrays (every process passes the same values); one
        process passes them as they are (cheaper)."""
        if jax.process_count() == 1:
            return arrays
        return tuple(jax.make_array_from_process_local_data(self._replicated, a) for a in arrays)


