"""LoRA: a frozen weight W plus a trainable low-rank update (alpha / rank) * A @ B.

Adapters are a separate tree beside the base params. For inference and export ``merge`` folds them
into the weights; in training ``attach`` pairs each weight with its adapter (``Adapted``), which the
model's projections apply to the activations: x W + scale * dropout(x) A B. That is where LoRA's
dropout acts, and the frozen W then needs no weight gradient at all. A weight's leading (input) axes
meet A, its trailing (output) axes meet B; each adapter takes the logical axes of the side of the
weight it mirrors, so adapters are sharded with their base weights. B starts at zero: before any
step the adapted model is the base model.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from fax.models.config import LORA_TARGETS

Params = dict[str, Any]

# Adaptable weights (path under ``blocks``) and how many leading axes are inputs (after ``layers``).


def _weight(params: Params, target: str) -> Any:
    module, name = target.split(".")
    return params["blocks"][module][name]


def adapter_shapes(base: Params, targets: tuple[str, ...], rank: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """{target: {"a": [layers, *inputs, rank], "b": [layers, rank, *outputs]}} for the stacked blocks."""
    out = {}
    for target in targets:
        shape = _weight(base, target).shape
        n_in = 1 + LORA_TARGETS[target]
        out[target] = {"a": (*shape[:n_in], rank), "b": (shape[0], rank, *shape[n_in:])}
    return out


def adapter_axes(base_axes: Params, targets: tuple[str, ...]) -> Params:
    """Logical axes of every adapter, taken from the side of its weight it mirrors."""
    out = {}
    for target in targets:
        axes = _weight(base_axes, target)
        n_in = 1 + LORA_TARGETS[target]
        out[target] = {"a": (*axes[:n_in], None), "b": (axes[0], None, *axes[n_in:])}
    return out


def init_adapters(base: Params, targets: tuple[str, ...], rank: int, seed: int) -> Params:
    """A ~ N(0, 1 / fan_in), B = 0."""
    keys = jax.random.split(jax.random.key(seed), len(targets))
    out = {}
    for key, (target, shapes) in zip(keys, adapter_shapes(base, targets, rank).items()):
        fan_in = 1
        for size in shapes["a"][1:-1]:
            fan_in *= size
        out[target] = {"a": jax.random.normal(key, shapes["a"], jnp.float32) / fan_in ** 0.5,
                       "b": jnp.zeros(shapes["b"], jnp.float32)}
    return out


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B over the rank axis, per layer: [L, *inputs, r] x [L, r, *outputs] -> [L, *inputs, *outputs]."""
    letters = iter(string.ascii_lowercase[2:])
    inputs = "".join(next(letters) for _ in range(a.ndim - 2))
    outputs = "".join(next(letters) for _ in range(b.ndim - 2))
    return jnp.einsum(f"z{inputs}r,zr{outputs}->z{inputs}{outputs}", a, b)


def _with_adapted(base: Params, adapters: Params, adapt: Callable[[int, str, jax.Array, Params], Any]) -> Params:
    """``base`` with every adapted weight W replaced by ``adapt(i, target, W, {"a": A, "b": B})``."""
    blocks = {module: dict(weights) for module, weights in base["blocks"].items()}
    for i, (target, ab) in enumerate(adapters.items()):
        module, name = target.split(".")
        blocks[module][name] = adapt(i, target, blocks[module][name], ab)
    return {**base, "blocks": blocks}


def merge(base: Params, adapters: Params, scale: float) -> Params:
    """The weights the model reads: each adapted W becomes W + scale * A @ B."""
    return _with_adapted(base, adapters, lambda _i, _target, w, ab: w + scale * delta(ab["a"], ab["b"]))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Adapted:
    """A frozen weight with its adapter, in the place of the weight in the params the model reads.
    In the stacked blocks every array (``key`` too: dropout key data) has the layer axis first."""

    base: jax.Array
    a: jax.Array
    b: jax.Array
    key: jax.Array
    n_in: int = field(metadata={"static": True})  # how many leading axes of ``base`` are inputs
    scale: float = field(metadata={"static": True})
    dropout: float = field(metadata={"static": True})

    def __getitem__(self, index: Any) -> Adapted:  # the model reads a parameter's value as ``w[...]``
        return self

    def linear(self, spec: str, x: jax.Array) -> jax.Array:
        """``einsum(spec, x, W)`` plus the adapter's update, in x's dtype."""
        operands, out = spec.split("->")
        x_axes, w_axes = operands.split(",")
        inputs, outputs = w_axes[:self.n_in], w_axes[self.n_in:]
        kept = "".join(axis for axis in x_axes if axis not in inputs)
        y = jnp.einsum(spec, x, self.base.astype(x.dtype))
        if self.dropout:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        low = jnp.einsum(f"{x_axes},{inputs}r->{kept}r", x, self.a.astype(x.dtype))
        return y + self.scale * jnp.einsum(f"{kept}r,r{outputs}->{out}", low, self.b.astype(x.dtype))


def for_microbatch(weights: Params, index: jax.Array | int) -> Params:
    """``weights`` whose adapters draw the dropout masks of microbatch ``index`` of the step (each
    microbatch its own, wherever it runs: accumulated or in a pipeline stage)."""
    def vary(w: Any) -> Any:
        if not isinstance(w, Adapted) or not w.dropout:
            return w
        n = w.key.shape[-1]  # key data of one layer's key, or of a stack of them
        fold = jnp.vectorize(lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), index)),
                             signature=f"({n})->({n})")
        return dataclasses.replace(w, key=fold(w.key))
    return jax.tree.map(vary, weights, is_leaf=lambda x: isinstance(x, Adapted))


def attach(base: Params, adapters: Params, scale: float, dropout: float, key: jax.Array) -> Params:
    """The weights the model reads in training: each adapted W becomes an ``Adapted``, with its own
    dropout key per layer (from ``key``, which should change every step)."""
    def adapt(i: int, target: str, w: jax.Array, ab: Params) -> Adapted:
        keys = jax.random.key_data(jax.random.split(jax.random.fold_in(key, i), ab["a"].shape[0]))
        return Adapted(w, ab["a"], ab["b"], keys, LORA_TARGETS[target], scale, dropout)
    return _with_adapted(base, adapters, adapt)
