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
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models import cpu_kernels
from fax.checkpoint import Checkpointer, checkpoint_dir
from fax.config import Config, ConfigError, run_config
from fax.data import HFTokenizer, TokenDataset, cache_dir, dataset_path, get_tokenizer
from fax import chat
from fax import step as step_lib
from fax.step import with_activation_sharding
from parallel import ParallelConfig, logical_sharding, make_mesh, replicated


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    # OpenAI's adjustments of the logits before sampling: minus frequency_penalty times the times a
    # token was generated so far, minus presence_penalty once it was; plus logit_bias's (id, bias) pairs.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def problems(self) -> list[str]:
        found = []
        if self.max_new_tokens <= 0:
            found.append(f"max_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            found.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                found.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            found.append(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            found.append("logit_bias values must be in [-100, 100]")
        return found


def request_problems(cfg: models.ModelConfig, prompt: Sequence[int], sampling: SamplingParams,
                     scored_only: bool = False, prompt_name: str = "prompt") -> list[str]:
    """What is wrong with a request, in words a client can act on (empty: nothing), each problem
    beginning with the name of the setting it is about; ``prompt_name`` is what the client calls the
    prompt (a conversation's ``messages``). A prompt ``scored_only`` (nothing generated) may fill the
    whole context."""
    found = sampling.problems()
    if any(not 0 <= token < cfg.vocab_size for token, _ in sampling.logit_bias):
        found.append(f"logit_bias token ids must be in [0, {cfg.vocab_size})")
    new_tokens = 0 if scored_only else sampling.max_new_tokens
    if not len(prompt):
        found.append(f"{prompt_name} is empty")
    elif len(prompt) + new_tokens > cfg.max_seq_len:
        found.append(f"{prompt_name} ({len(prompt)} tokens) + max_tokens ({new_tokens}) exceeds the "
                     f"model's context of {cfg.max_seq_len} tokens; shorten the {prompt_name} or lower max_tokens")
    return found


MAX_LOGPROBS = 5  # the most likely tokens a request may ask to see at each position (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # the tokens a request's logit_bias may name (OpenAI's limit)
TOKENS_PER_CALL = 8  # decode steps per device call: fewer host round trips, tokens arrive in bursts
# XLA:CPU's YNN matmul fusions run decode's skinny products (one token per sequence against each weight,
# a memory-bound read of the weights) ~20% slower at batch 16 than its own dot emitter; batches 1-4 equal.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# The share of a device's memory the params and the largest KV cache may take (the rest: prefill's
# activations and XLA's scratch).
SERVING_MEMORY_SHARE = 0.9
GREEDY_PAD = SamplingParams(max_new_tokens=1, temperature=0.0)  # the rows that fill a batch bucket


def _controls(rows: Sequence[SamplingParams]) -> tuple[np.ndarray, ...]:
    """Per-row sampling settings as the arrays the compiled functions take: those of ``sample``, then
    those of ``adjust``. The logit biases are MAX_LOGIT_BIAS (id, bias) pairs a row, padded with (0, 0),
    or none at all when no row has any (two shapes, so two compilations at most)."""
    width = MAX_LOGIT_BIAS if any(s.logit_bias for s in rows) else 0
    bias_ids, biases = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.float32)
    for i, s in enumerate(rows):
        for j, (token, bias) in enumerate(s.logit_bias):
            bias_ids[i, j], biases[i, j] = token, bias
    return (np.array([s.seed for s in rows], np.uint32), np.array([s.temperature for s in rows], np.float32),
            np.array([s.top_k for s in rows], np.int32), np.array([s.top_p for s in rows], np.float32),
            np.array([s.frequency_penalty for s in rows], np.float32),
            np.array([s.presence_penalty for s in rows], np.float32), bias_ids, biases)


def adjust(logits: jax.Array, counts: jax.Array, frequency: jax.Array, presence: jax.Array, bias_ids: jax.Array,
           biases: jax.Array) -> jax.Array:
    """Each row's logits [b, vocab] after its penalties, given how many times it has generated each
    token (``counts`` [b, vocab]), and its logit biases."""
    logits = logits.at[jnp.arange(logits.shape[0])[:, None], bias_ids].add(biases)
    return jax.lax.cond(jnp.any(frequency != 0) | jnp.any(presence != 0),
                        lambda: logits - frequency[:, None] * counts - presence[:, None] * (counts > 0),
                        lambda: logits)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row: keep the ``top_k`` largest logits (0: all), then the smallest set whose probability
    reaches ``top_p``; the rest become -inf."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(ordered, (jnp.clip(top_k, 1, vocab) - 1)[:, None], axis=-1)
    logits = jnp.where((top_k[:, None] > 0) & (logits < kth), -jnp.inf, logits)
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    before = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1) - jax.nn.softmax(ordered, axis=-1)
    cutoff = jnp.min(jnp.where(before < top_p[:, None], ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def argmax(x: jax.Array) -> jax.Array:
    """The index of the largest value along the last axis (the first on ties; a NaN counts as the
    largest, as in ``jnp.argmax``), from two plain reductions: XLA:CPU's arg-reduction is 2.5x
    slower (22 vs 9 us over a batch of 16 x 512 logits; 1.8 vs 0.7 ms over GPT-2's vocabulary)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), ids, x.shape[-1]), axis=-1)


def sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """One token per row; row b's randomness depends only on (seeds[b], steps[b]), not on its batch."""
    greedy = argmax(logits)

    def drawn() -> jax.Array:
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        filtered = jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1),  # the sorts cost more than the model
                                lambda: filter_logits(scaled, top_k, top_p), lambda: scaled)
        # jax.random.categorical's Gumbel-max draw, with the faster argmax
        return jax.vmap(lambda key, row: argmax(row + jax.random.gumbel(key, row.shape, row.dtype)))(keys, filtered)

    return jnp.where(temperature > 0, jax.lax.cond(jnp.any(temperature > 0), drawn, lambda: greedy), greedy)


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


def _decode(graphdef: nnx.GraphDef, tokens_per_call: int, decode_kernel: bool, params: Any,
            weights: models.ServingWeights, cache: Any, counts: jax.Array, tokens: jax.Array, positions: jax.Array,
            steps: jax.Array, *controls: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    """``tokens_per_call`` tokens [rows, n] for each cache row, each fed back for the next, in one
    device call; the rows' counts of generated tokens [rows, vocab] follow them."""
    rows = jnp.arange(tokens.shape[0])
    Carry = tuple[jax.Array, Any, jax.Array]  # the last tokens, the cache, the counts

    def one(carry: Carry, i: jax.Array) -> tuple[Carry, jax.Array]:
        token, cache, counts = carry
        logits, cache = models.apply_cached(graphdef, params, weights, token[:, None], (positions + i)[:, None], cache,
                                            decode_kernel=decode_kernel)
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
        tensor = max(t for t in range(1, len(devices) + 1)
                     if all(n % t == 0 for n in (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size)))
    return make_mesh(ParallelConfig(fsdp=1, tensor=tensor), list(devices)[:tensor])


def decode_kernel_runs(cfg: models.ModelConfig, mesh: jax.sharding.Mesh) -> bool:
    """Whether decode on ``mesh`` can attend by the CPU kernel: one CPU device (the custom call has
    no sharding rule), a model the kernel supports, and the kernel built."""
    return (mesh.size == 1 and mesh.devices.flat[0].platform == "cpu" and cpu_kernels.supports_decode_attention(cfg)
            and cpu_kernels.decode_attention_ready(cache_dir() / "kernels"))


def param_layout(cfg: models.ModelConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """The model's graph, its params' shapes (no memory) and their shardings on ``mesh`` (no adapters:
    an engine serves merged weights)."""
    graphdef, target, _, shardings = step_lib.param_layout(Config(model=cfg), mesh)
    return graphdef, target, shardings


def device_memory_bytes(device: jax.Device) -> int | None:
    """What the device can allocate (None where it does not say, as on the CPU)."""
    stats = device.memory_stats()
    return stats.get("bytes_limit") if stats else None


def run_params(run_dir: str | Path, config: Config, mesh: jax.sharding.Mesh, step: int | None = None,
               merged: bool = True) -> tuple[Any, int]:
    """A run's params of ``step`` (default: its latest complete checkpoint), restored onto ``mesh``;
    LoRA adapters come merged into their weights unless ``merged`` is False."""
    ckpt = Checkpointer(checkpoint_dir(run_dir, config.checkpoint), read_only=True)
    step = ckpt.complete_step(step, run_dir)
    _, target, _, shardings = step_lib.param_layout(config, mesh)
    params = ckpt.restore_params(step, target, shardings)
    return (step_lib.model_params(params, config.lora) if merged else params), step


class Engine:
    """The device side of generation: params, one KV cache (a row per request), and compiled
    functions whose shapes all come from a few static buckets. The cache holds as many rows as
    the rows in use need (a batch bucket) and as many slots as the furthest position in use needs
    (a span bucket), resized between calls when either changes: attention then reads the whole
    cache, where a slice of a larger one would be a copy at every token (19% of a batch-16 decode
    step on the CPU; 15% of the tokens/s of 4 requests in a 16-row cache). A ``Batcher`` decides
    what runs; every process of a multi-host engine receives the same calls. On one CPU device,
    decode attends by a compiled kernel (``decode_kernel``; ``models.cpu_kernels``): 1.2x the
    tokens/s of a batch-16 decode at 96 positions, where XLA:CPU's attention takes about half the step."""

    def __init__(self, cfg: models.ModelConfig, params: Any, mesh: jax.sharding.Mesh, max_batch: int = 8,
                 end_ids: Sequence[int] = (), tokens_per_call: int = TOKENS_PER_CALL,
                 decode_kernel: bool | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.end_ids = tuple(end_ids)  # tokens that end a request (not emitted): end of text, end of turn
        self.step: int | None = None  # the checkpoint step the params came from, if any
        self.graphdef, _, shardings = param_layout(cfg, mesh)
        self.params = models.unstack_layers(jax.device_put(params, shardings))
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
        if decode_kernel is None:
            decode_kernel = decode_kernel_runs(cfg, mesh)
        elif decode_kernel and not decode_kernel_runs(cfg, mesh):
            raise ValueError(f"decode_kernel=True needs one CPU device, a float32 model whose head dim is one of "
                             f"{cpu_kernels.DECODE_ATTENTION_HEAD_DIMS} and a C++ compiler to build the kernel; "
                             "leave it None to use the kernel where it runs")
        self.decode_kernel = decode_kernel
        self._decode = jax.jit(with_activation_sharding(
            functools.partial(_decode, self.graphdef, tokens_per_call, self.decode_kernel), mesh),
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
        """The params of a run directory's latest (or ``step``'s) checkpoint, restored onto this mesh.
        ``end_ids``: ``generation_ends`` of the run's tokenizer, from a caller that holds it already
        (default: the tokenizer is read here)."""
        config = run_config(run_dir)
        mesh = serving_mesh(config.model, jax.devices() if devices is None else devices, tensor)
        params, step = run_params(run_dir, config, mesh, step)
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
        otherwise stall every running request for the compile (~1 s each on a CPU, 35 decode shapes
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
            tokens, lengths, *_controls([*sampling, *[GREEDY_PAD] * pad])))
        self.cache = self._insert(self.cache, fresh, *self._put(targets))
        self.counts = self._count_first(self.counts, *self._put(targets), first)
        return np.asarray(first)[:len(prompts)], np.asarray(logits)[:len(prompts)]

    def decode(self, tokens: np.ndarray, positions: np.ndarray, steps: np.ndarray,
               sampling: Sequence[SamplingParams]) -> np.ndarray:
        """Feed a token to each of the first ``len(tokens)`` cache rows; the next tokens of each [rows, n]."""
        self._fit(len(tokens), int(positions.max()) + self.tokens_per_call)  # the rows past len(tokens) are free
        out, self.cache, self.counts = self._decode(self.params, self.weights, self.cache, self.counts, *self._put(
            tokens.astype(np.int32), positions.astype(np.int32), steps.astype(np.int32), *_controls(sampling)))
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


Event = tuple[Any, int | None, bool]  # (request key, its new token or None at end-of-text, finished)


@dataclass
class _Row:
    """A request occupying one cache row."""

    key: Any
    sampling: SamplingParams
    position: int  # where the next token fed to the model goes
    token: int = 0  # the last sampled token: fed at the next decode
    emitted: int = 0


class Batcher:
    """Continuous batching over an engine's cache rows: requests join free rows between decode
    steps and leave as soon as they finish, so a long generation never holds back a short one.
    Decode runs over the smallest batch bucket that covers the occupied rows. One batcher drives
    an engine at a time; the engine may be a proxy for the processes of a multi-host engine."""

    def __init__(self, engine: Any, rows: int | None = None):
        self.engine = engine
        self.rows: list[_Row | None] = [None] * (rows or engine.max_batch)
        engine.reset()

    def clear(self) -> None:
        """Drop every request and start from an empty cache."""
        self.rows = [None] * len(self.rows)
        self.engine.reset()

    @property
    def free(self) -> int:
        return self.rows.count(None)

    @property
    def active(self) -> int:
        return len(self.rows) - self.free

    def admit(self, requests: Sequence[tuple[Any, tuple[Sequence[int], SamplingParams]]]) -> list[Event]:
        """Prefill requests (key, (prompt, sampling)) into free rows (at most ``free`` of them)."""
        if not requests:
            return []
        if len(requests) > self.free:
            raise ValueError(f"{len(requests)} requests but only {self.free} free cache rows")
        rows = [i for i, r in enumerate(self.rows) if r is None][:len(requests)]
        for i, (key, (prompt, sampling)) in zip(rows, requests):
            self.rows[i] = _Row(key, sampling, len(prompt))
        first = self.engine.prefill(rows, [p for _, (p, _) in requests], [s for _, (_, s) in requests])
        return [self._emit(i, int(t)) for i, t in zip(rows, first)]

    def step(self) -> list[Event]:
        """One decode call (several tokens) for every occupied row."""
        occupied = [i for i, r in enumerate(self.rows) if r is not None]
        if not occupied:
            return []
        rows = self.rows[:bucket(self.engine.batch_buckets, occupied[-1] + 1)]
        tokens, positions, emitted = (np.array([getattr(r, name) if r else 0 for r in rows])
                                      for name in ("token", "position", "emitted"))
        tokens = self.engine.decode(tokens, positions, emitted, [r.sampling if r else GREEDY_PAD for r in rows])
        events = []
        for i in occupied:
            for token in tokens[i]:  # the tokens after its end (length or end-of-text) are dropped
                self.rows[i].position += 1
                events.append(self._emit(i, int(token)))
                if self.rows[i] is None:
                    break
        return events

    def cancel(self, key: Any) -> None:
        """Free the row of a request nobody waits for any more."""
        self.rows = [None if r is not None and r.key == key else r for r in self.rows]

    def _emit(self, i: int, token: int) -> Event:
        row = self.rows[i]
        eos = token in self.engine.end_ids
        if not eos:
            row.token, row.emitted = token, row.emitted + 1
        finished = eos or row.emitted >= row.sampling.max_new_tokens
        if finished:
            self.rows[i] = None
        return row.key, None if eos else token, finished


def stream(engine: Any, prompts: Sequence[Sequence[int]],
           sampling: Sequence[SamplingParams]) -> Iterator[list[int | None]]:
    """Yield, step by step, each prompt's next token (None once it is done: it reached its
    max_new_tokens or produced the end-of-text token). Prompts may have different lengths;
    ``engine`` is an ``Engine`` or a multi-host one."""
    problems = [f"request {i}: {p}" for i, (ids, s) in enumerate(zip(prompts, sampling))
                for p in request_problems(engine.cfg, ids, s)]
    if problems:
        raise ValueError("; ".join(problems))
    if len(prompts) > engine.max_batch:
        raise ValueError(f"{len(prompts)} prompts exceed the engine's max_batch={engine.max_batch}")
    batcher = Batcher(engine, bucket(engine.batch_buckets, len(prompts)))
    events = batcher.admit(list(enumerate(zip(prompts, sampling))))
    while events:
        per_row: list[list[int | None]] = [[] for _ in prompts]
        for row, token, _ in events:  # a decode call gives each row several tokens
            per_row[row].append(token)
        for i in range(max(map(len, per_row))):
            yield [tokens[i] if i < len(tokens) else None for tokens in per_row]
        events = batcher.step()


def generate(engine: Any, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[list[int]]:
    """Each prompt's continuation (see ``stream``)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(engine, prompts, sampling):
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out


class Busy(RuntimeError):
    """More requests than ``max_pending`` are running or waiting."""


Sink = Callable[[tuple[int | None, bool] | BaseException], None]  # receives (token, finished) or the failure


class Scheduler:
    """A ``Batcher`` on a thread of its own. Callers on any thread submit requests and receive
    each token through a callback as it is produced; queued requests join the running batch as
    soon as rows free up. An engine failure fails the requests it touched, not the scheduler."""

    def __init__(self, engine: Any, max_pending: int):
        self.engine, self.max_pending = engine, max_pending
        self.batcher = Batcher(engine)
        self._queue: deque[tuple[object, tuple[list[int], SamplingParams]]] = deque()
        self._sinks: dict[object, Sink] = {}
        self._cancelled: set[object] = set()
        self._scores: deque[tuple[list[int], Future]] = deque()
        self._scoring = 0  # scores asked for and not yet done
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fax-scheduler", daemon=True)
        self._thread.start()

    def _check_room(self) -> None:
        """Busy once max_pending requests are running, queued or being scored (under the lock)."""
        pending = len(self._sinks) + self._scoring
        if pending >= self.max_pending:
            raise Busy(f"{pending} requests are running, queued or being scored (the limit, max_concurrent="
                       f"{self.max_pending}); retry later")

    def submit(self, prompt: list[int], sampling: SamplingParams, sink: Sink) -> object:
        with self._wake:
            self._check_room()
            key = object()
            self._sinks[key] = sink
            self._queue.append((key, (prompt, sampling)))
            self._wake.notify()
        return key

    def score(self, tokens: list[int], request: bool = False) -> Future:
        """The engine's ``score`` of ``tokens``, run between decode calls (every engine call is made
        from this thread: a multi-host engine's processes must all make the same calls in order).
        A ``request`` of its own is refused (Busy) like a generation when the scheduler is full; the
        scoring of a finished generation is not (that request had its place)."""
        future: Future = Future()
        with self._wake:
            if request:
                self._check_room()
            self._scoring += 1
            self._scores.append((tokens, future))
            self._wake.notify()
        return future

    def cancel(self, key: object) -> None:
        """Stop a request nobody waits for any more (a no-op once it has finished)."""
        with self._wake:
            if self._sinks.pop(key, None) is not None:
                self._cancelled.add(key)
                self._wake.notify()

    def load(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._sinks) - len(self._queue), "queued": len(self._queue),
                    "scoring": self._scoring}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self._queue or self._cancelled or self._scores
                                    or self.batcher.active)
                if self._closed:
                    for _, future in self._scores:
                        future.cancel()
                    return
                scores, self._scores = self._scores, deque()
                for key in self._cancelled:
                    self.batcher.cancel(key)
                self._queue = deque(item for item in self._queue if item[0] not in self._cancelled)
                self._cancelled.clear()
                joining = [self._queue.popleft() for _ in range(min(len(self._queue), self.batcher.free))]
            for tokens, future in scores:
                try:
                    future.set_result(self.engine.score(tokens))
                except Exception as error:  # noqa: BLE001 - this request's failure, not the server's
                    future.set_exception(error)
            with self._wake:
                self._scoring -= len(scores)
            try:
                events = self.batcher.admit(joining) + self.batcher.step()
            except Exception as error:  # noqa: BLE001 - reported to every request it touched
                self._fail([key for key, _ in joining] + [r.key for r in self.batcher.rows if r], error)
                continue
            with self._wake:
                for key, token, finished in events:
                    sink = self._sinks.pop(key, None) if finished else self._sinks.get(key)
                    if sink is not None:
                        sink((token, finished))

    def _fail(self, keys: list[object], error: Exception) -> None:
        with self._wake:
            for key in keys:
                sink = self._sinks.pop(key, None)
                if sink is not None:
                    sink(error)
        try:
            self.batcher.clear()
        except Exception:  # noqa: BLE001 - the engine is unusable: the next requests fail with its error
            pass


def generation_ends(tokenizer: Any, conversation: chat.Layout | None = None) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's end of text, and the end of an assistant's
    turn where its chat template writes a token for it (Llama 3's ``<|eot_id|>``). ``conversation``:
    the tokenizer's ``chat.layout``, when the caller has built it."""
    return (tokenizer.eos_id, *(conversation or chat.layout(tokenizer)).end_ids)


def run_tokenizer(config: Config):
    """The tokenizer the run was trained with: its own copy, else the one of its dataset."""
    if (Path(config.run_dir) / HFTokenizer.name).exists():
        return get_tokenizer(HFTokenizer.name, config.run_dir)
    path = dataset_path(config.data.path)
    return TokenDataset.open(path).tokenizer(path)


class TextStream:
    """Turns tokens into text deltas, holding back bytes of a character not yet complete, and
    ending at the first stop sequence (which is not part of the output)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            text = text[:min(hits)]
        elif text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        else:  # hold back a tail that could still grow into a stop sequence
            hold = max((k for s in self.stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        delta = text[len(self.sent):]
        self.sent += delta
        return delta

    def flush(self) -> str:
        """What was held back, once the generation has ended without a stop."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        delta, self.sent = text[len(self.sent):], text
        return delta
