"""How a request is continued: its sampling settings, their checks, and the sampling maths
(penalties, biases, top-k / top-p, temperature) as pure functions of the logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fax.models.config import ModelConfig

MAX_LOGPROBS = 5  # the most likely tokens a request may ask to see at each position (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # the tokens a request's logit_bias may name (OpenAI's limit)


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
        if not 0 <= self.top_k < 2 ** 31:
            found.append(f"top_k must be in [0, 2**31) (0: no top-k filter), got {self.top_k}")
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


def request_problems(cfg: ModelConfig, prompt: Sequence[int], sampling: SamplingParams,
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


GREEDY_PAD = SamplingParams(max_new_tokens=1, temperature=0.0)  # the rows that fill a batch bucket


def controls(rows: Sequence[SamplingParams]) -> tuple[np.ndarray, ...]:
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
    largest, as in ``jnp.argmax``), from two plain reductions: XLA:CPU's arg-reduction is
    slower (see benchmarks/results/generate.json)."""
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

