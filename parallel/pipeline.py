"""Pipeline parallelism inside the one compiled step: the stack of layers split over the ``stage``
mesh axis, microbatches flowing through a GPipe schedule.

Every stage holds ``n_layers / stages`` consecutive layers (the params' ``layers`` axis is sharded
over ``stage``). At each tick all stages run at once (a ``vmap`` over stages whose stage axis is
the mesh's, so each device group computes only its own stage), then each stage's output moves to
the next stage (a collective permute) while stage 0 takes the next microbatch. ``M`` microbatches
through ``S`` stages take ``M + S - 1`` ticks; the backward pass is the same schedule reversed
(autodiff through the scan). Being one jitted program, it runs multi-host unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fax.models.sharding import constrain
from fax.models.transformer import RunLayers, scan_layers
from fax.parallel.config import ticks

STAGE_STATE = ("stage", "batch", "length", "embed")  # one microbatch of hidden states per stage


def _stage_state(state: Any) -> Any:
    """Every leaf of the stages' carry [stage, batch, length, ...] sharded by stage (the hidden
    states, and the rows' document ids, which take the leading names)."""
    return jax.tree.map(lambda x: constrain(x, STAGE_STATE[:x.ndim]), state)


def split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """[batch, ...] -> [microbatches, batch / microbatches, ...]; microbatch m takes rows m, m + M, ...
    so every data shard of the batch feeds every microbatch."""
    return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of ``split_microbatches``."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def by_stage(layer_params: Any, stages: int) -> Any:
    """[layers, ...] -> [stages, layers / stages, ...]: stage s holds layers s*L/S .. (s+1)*L/S - 1."""
    return jax.tree.map(lambda p: p.reshape(stages, p.shape[0] // stages, *p.shape[1:]), layer_params)


def gpipe(stages: int, microbatches: int, for_microbatch: Callable[[Any, jax.Array], Any] | None = None
          ) -> RunLayers:
    """A ``RunLayers`` that pipelines the stack over ``stages`` with ``microbatches`` microbatches;
    ``for_microbatch(layer_params, m)``, if given, specializes a stage's layers to microbatch m
    (its dropout masks)."""
    specialize = for_microbatch or (lambda params, _: params)

    def run(layer: Any, layer_params: Any, x: Any) -> Any:
        staged = by_stage(layer_params, stages)
        inputs = jax.tree.map(lambda a: split_microbatches(a, microbatches), x)
        run_stages = jax.vmap(lambda p, h, m: scan_layers(layer, specialize(p, m), h), spmd_axis_name="stage")

        def tick(state: Any, incoming_t: tuple[Any, jax.Array]) -> tuple[Any, Any]:
            incoming, t = incoming_t
            done = run_stages(staged, state, t - jnp.arange(stages))  # stage s works on microbatch t - s
            state = jax.tree.map(lambda i, d: jnp.concatenate([i[None], d[:-1]], axis=0), incoming, done)
            return _stage_state(state), jax.tree.map(lambda d: d[-1], done)

        n = ticks(stages, microbatches)
        # Stage 0 takes microbatch t + 1 after tick t (past the last, a repeat whose result is dropped).
        incoming = jax.tree.map(lambda a: a[jnp.minimum(jnp.arange(1, n + 1), microbatches - 1)], inputs)
        first = jax.tree.map(lambda a: jnp.concatenate([a[:1], jnp.zeros((stages - 1, *a.shape[1:]), a.dtype)]), inputs)
        _, finished = jax.lax.scan(tick, _stage_state(first), (incoming, jnp.arange(n)))
        # The last stage finishes microbatch t - (S - 1) at tick t: the first S - 1 ticks' results are scratch.
        return jax.tree.map(lambda f: merge_microbatches(f[stages - 1:]), finished)

    return run
