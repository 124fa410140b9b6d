"""Text sampling by recomputing the forward pass over a fixed window (the serving path adds a KV cache)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token(graphdef: nnx.GraphDef, params: Any, window: jax.Array, position: jax.Array, key: jax.Array,
                temperature: jax.Array) -> jax.Array:
    logits = models.apply(graphdef, params, window[None])[0, position]
    greedy = jnp.argmax(logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy)


def generate(graphdef: nnx.GraphDef, params: Any, prompt: np.ndarray, new_tokens: int, window: int,
             temperature: float = 0.8, seed: int = 0, vocab_limit: int | None = None) -> list[int]:
    """Continue ``prompt`` by ``new_tokens`` tokens. One compiled shape: a window of ``window`` tokens,
    right-padded, whose causal attention makes the padding invisible to earlier positions."""
    tokens = [int(t) for t in prompt][-window:]
    key = jax.random.key(seed)
    out: list[int] = []
    for _ in range(new_tokens):
        context = tokens[-window:]
        buf = np.zeros(window, np.int32)
        buf[:len(context)] = context
        key, sub = jax.random.split(key)
        token = int(_next_token(graphdef, params, jnp.asarray(buf), jnp.int32(len(context) - 1), sub,
                                jnp.float32(temperature)))
        if vocab_limit is not None and token >= vocab_limit:
            break  # the end-of-document token, or a padded-vocabulary id the tokenizer never emits
        tokens.append(token)
        out.append(token)
    return out
