"""Inference from a run's sharded params: batched prefill and KV-cache decode with static shapes.

An ``Engine`` restores the params of a run directory (params only, onto any mesh; by default
tensor-parallel over the local devices) and compiles two functions per batch bucket: prefill of
right-padded prompts (one compile per prompt-length bucket) and one-token decode. The KV cache is
sharded like the attention heads. Requests never trigger a compile beyond those buckets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from fax.checkpoint import Checkpointer, checkpoint_dir
from fax.config import Config, ConfigError, run_config
from fax.data import TokenDataset, dataset_path, get_tokenizer
from fax.step import with_activation_sharding
from parallel import ParallelConfig, logical_sharding, make_mesh, replicated, tree_shardings


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

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
        return found


GREEDY_PAD = SamplingParams(max_new_tokens=1, temperature=0.0)  # the rows that fill a batch bucket


def _controls(rows: Sequence[SamplingParams]) -> tuple[np.ndarray, ...]:
    """Per-row sampling settings as the arrays the compiled functions take."""
    return (np.array([s.seed for s in rows], np.uint32), np.array([s.temperature for s in rows], np.float32),
            np.array([s.top_k for s in rows], np.int32), np.array([s.top_p for s in rows], np.float32))


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


def sample(logits: jax.Array, seeds: jax.Array, step: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """One token per row; row b's randomness depends only on (seeds[b], step), not on its batch."""
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)
    scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6)[:, None], top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _prefill(graphdef: nnx.GraphDef, params: Any, cache: Any, tokens: jax.Array, lengths: jax.Array,
             seeds: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, cache = models.apply_cached(graphdef, params, tokens, positions, cache, last=lengths - 1)
    return sample(logits, seeds, jnp.int32(0), temperature, top_k, top_p), cache, logits


def _decode(graphdef: nnx.GraphDef, params: Any, cache: Any, tokens: jax.Array, positions: jax.Array,
            step: jax.Array, seeds: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> tuple[jax.Array, Any]:
    logits, cache = models.apply_cached(graphdef, params, tokens[:, None], positions[:, None], cache)
    return sample(logits, seeds, step, temperature, top_k, top_p), cache


def buckets(limit: int, smallest: int) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``limit`` (``limit`` itself always included)."""
    sizes = [smallest * 2 ** i for i in range(max(0, math.ceil(math.log2(max(limit / smallest, 1)))))]
    return tuple(sorted({s for s in sizes if s < limit} | {limit}))


def serving_mesh(cfg: models.ModelConfig, devices: Sequence[jax.Device], tensor: int = 0) -> jax.sharding.Mesh:
    """Tensor parallelism over the largest number of ``devices`` that divides the heads, kv heads,
    MLP and vocabulary (or exactly ``tensor`` devices)."""
    if not tensor:
        tensor = max(t for t in range(1, len(devices) + 1)
                     if all(n % t == 0 for n in (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size)))
    return make_mesh(ParallelConfig(fsdp=1, tensor=tensor), list(devices)[:tensor])


def param_layout(cfg: models.ModelConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """The model's graph, its params' shapes (no memory) and their shardings on ``mesh``."""
    graphdef, abstract_state = models.abstract(cfg)
    return graphdef, nnx.to_pure_dict(abstract_state), tree_shardings(models.logical_axes(abstract_state), mesh)


class Engine:
    """Batched generation over a mesh; every shape comes from a few static buckets."""

    def __init__(self, cfg: models.ModelConfig, params: Any, mesh: jax.sharding.Mesh, max_batch: int = 8,
                 eos_id: int | None = None):
        self.cfg, self.mesh, self.eos_id = cfg, mesh, eos_id
        self.step: int | None = None  # the checkpoint step the params came from, if any
        self.graphdef, _, shardings = param_layout(cfg, mesh)
        self.params = jax.device_put(params, shardings)
        self.batch_buckets = buckets(max_batch, 1)
        self.length_buckets = buckets(cfg.max_seq_len, min(16, cfg.max_seq_len))
        self.cache_sharding = logical_sharding(models.CACHE_LOGICAL_AXES, mesh)
        rep = replicated(mesh)
        self._prefill = jax.jit(with_activation_sharding(functools.partial(_prefill, self.graphdef), mesh),
                                out_shardings=(rep, self.cache_sharding, rep), donate_argnums=(1,))
        self._decode = jax.jit(with_activation_sharding(functools.partial(_decode, self.graphdef), mesh),
                               out_shardings=(rep, self.cache_sharding), donate_argnums=(1,))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, devices: Sequence[jax.Device] | None = None, tensor: int = 0,
                     step: int | None = None, max_batch: int = 8) -> Engine:
        """The params of a run directory's latest (or ``step``'s) checkpoint, restored onto this mesh."""
        config = run_config(run_dir)
        ckpt = Checkpointer(checkpoint_dir(run_dir, config.checkpoint), read_only=True)
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.steps():
            raise ConfigError(f"{str(run_dir)!r} has no complete checkpoint{'' if step is None else f' of step {step}'}"
                              f"; steps: {ckpt.steps()}. Train first (fax train run_dir={run_dir})")
        mesh = serving_mesh(config.model, jax.devices() if devices is None else devices, tensor)
        _, target, shardings = param_layout(config.model, mesh)
        engine = cls(config.model, ckpt.restore_params(step, target, shardings), mesh, max_batch,
                     run_tokenizer(config).eos_id)
        engine.step = step
        return engine

    def check(self, prompt: Sequence[int], sampling: SamplingParams) -> list[str]:
        """What is wrong with a request, in words a client can act on (empty: nothing)."""
        found = sampling.problems()
        if not len(prompt):
            found.append("prompt is empty")
        elif len(prompt) + sampling.max_new_tokens > self.cfg.max_seq_len:
            found.append(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_new_tokens}) exceeds the "
                         f"model's context of {self.cfg.max_seq_len} tokens; shorten the prompt or lower max_tokens")
        return found

    def stream(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> Iterator[list[int | None]]:
        """Yield, step by step, each row's next token (None once a row is done: it reached its
        max_new_tokens or produced the end-of-text token). Rows may have different lengths."""
        problems = [f"request {i}: {p}" for i, (ids, s) in enumerate(zip(prompts, sampling)) for p in self.check(ids, s)]
        if problems:
            raise ValueError("; ".join(problems))
        if len(prompts) > self.batch_buckets[-1]:
            raise ValueError(f"{len(prompts)} prompts exceed the engine's max_batch={self.batch_buckets[-1]}")
        n = len(prompts)
        tokens, lengths = self._pack(prompts)
        batch = len(lengths)
        rows = [*sampling, *[GREEDY_PAD] * (batch - n)]
        controls = _controls(rows)
        token, cache, _ = self._prefill(self.params, self._empty_cache(batch), tokens, lengths, *controls)
        budget = np.array([s.max_new_tokens for s in rows])
        done = np.zeros(batch, bool)
        positions = lengths.copy()
        for step in range(1, int(budget[:n].max()) + 1):
            ids = np.asarray(token)
            out: list[int | None] = []
            for i in range(n):
                stop = done[i] or (self.eos_id is not None and ids[i] == self.eos_id)
                done[i] = stop or step >= budget[i]
                out.append(None if stop else int(ids[i]))
            yield out
            if done[:n].all():
                return
            token, cache = self._decode(self.params, cache, ids, positions, np.int32(step), *controls)
            positions = positions + 1

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, sampling):
            for row, token in zip(out, step):
                if token is not None:
                    row.append(token)
        return out

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The next-token logits after each prompt (for checks against the training forward pass)."""
        tokens, lengths = self._pack(prompts)
        batch = len(lengths)
        logits = self._prefill(self.params, self._empty_cache(batch), tokens, lengths,
                               *_controls([GREEDY_PAD] * batch))[2]
        return np.asarray(logits)[:len(prompts)]

    def _pack(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts right-padded into the smallest batch and length buckets that hold them."""
        batch = next(b for b in self.batch_buckets if b >= len(prompts))
        lengths = np.array([len(p) for p in prompts] + [1] * (batch - len(prompts)), np.int32)
        tokens = np.zeros((batch, next(b for b in self.length_buckets if b >= lengths.max())), np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)] = ids
        return tokens, lengths

    def _empty_cache(self, batch: int) -> Any:
        return jax.device_put(models.empty_cache(self.cfg, batch, self.cfg.max_seq_len), self.cache_sharding)


def run_tokenizer(config: Config):
    """The tokenizer the run's dataset was written with."""
    return get_tokenizer(TokenDataset.open(dataset_path(config.data.path)).meta["tokenizer"])


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
