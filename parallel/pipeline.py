"""Pipeline parallelism inside the one compiled step: the stack of layers split over the ``stage``
mesh axis, microbatches flowing through the stages tick by tick.

At each tick all stages run at once (a ``vmap`` over stages whose stage axis is the mesh's, so each
device group computes only its own stage), then each stage's output moves to the next stage (a
collective permute) while stage 0 takes the next microbatch. The backward pass is the same schedule
reversed (autodiff through the scan). Being one jitted program, it runs multi-host unchanged.

Two choices shape it (``fax.parallel.config.Schedule``):

- **virtual stages** V: the stack is cut into S x V chunks and stage s holds chunks s, s + S, ...;
  a microbatch goes round the ring of stages V times. The bubble falls from (S - 1) / (M + S - 1)
  to (S - 1) / (V M + S - 1) (Megatron's interleaved schedule). It needs bounded memory (below): a
  tick's chunk is then selected anew in the backward pass, where autodiff would keep a copy per
  tick. The params stay stored in layer order, split into S consecutive blocks, so each step moves
  every stage's other chunks to it over the stage axis (an all-to-all of the stage's params forward
  and of its gradients backward).
- **bounded memory**: each tick's stage is recomputed from its input in the backward pass, so what a
  step keeps is one hidden state per tick and stage, plus the layer activations of one microbatch at
  a time, instead of every tick's layer activations (which grow with M).

The pipeline's output rows are spread over the stages (with whole groups of S microbatches), so that
the final norm, LM head and loss run on each stage's share of the rows (the caller reads ``batch``
as ``head_layout`` says there, a piece of rows at a time), not all of them on every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fax.models.sharding import constrain
from fax.models.transformer import RunLayers, scan_layers
from fax.parallel.config import Schedule

# One microbatch of hidden states per stage: the residual stream (with sequence parallelism its length is
# split over the tensor axis too, so a tick's state, kept per tick, shrinks with it).
STAGE_STATE = ("stage", "batch", "residual_length", "embed")
SPREAD = ("pipelined_batch", "length", "embed")  # the rows over the stages too, for the head and loss


def head_layout(schedule: Schedule) -> tuple[str, int]:
    """How the head and loss read the stack's output: the logical axis its rows are laid out by, and
    in how many pieces of rows, one after another, so that one device's logits at a time are as many
    as one microbatch's (they do not grow with M)."""
    if schedule.stages == 1:
        return "batch", 1
    if schedule.head_spread:
        return "pipelined_batch", schedule.microbatches // schedule.stages
    return "batch", schedule.microbatches


def _leading(names: tuple[str, ...], x: jax.Array, rows: int) -> tuple[str | None, ...]:
    """The names of the hidden states for them, the first ``rows`` of them for what else travels with
    the rows (document ids, router statistics)."""
    return names if x.ndim == len(names) else names[:rows] + (None,) * (x.ndim - rows)


def _stage_state(state: Any) -> Any:
    """Every leaf of the stages' carry [stage, batch, ...] sharded by stage."""
    return jax.tree.map(lambda x: constrain(x, _leading(STAGE_STATE, x, 2)), state)


def _spread(x: Any) -> Any:
    return jax.tree.map(lambda a: constrain(a, _leading(SPREAD, a, 1)), x)


def split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """[batch, ...] -> [microbatches, batch / microbatches, ...]; microbatch m takes rows m, m + M, ...
    so every data shard of the batch feeds every microbatch."""
    return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of ``split_microbatches``."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def by_stage(layer_params: Any, stages: int, virtual: int = 1) -> Any:
    """[layers, ...] -> [stages, virtual, layers / (stages x virtual), ...]: stage s, pass v holds
    chunk v x S + s of consecutive layers."""
    def split(p: jax.Array) -> jax.Array:
        chunks = p.reshape(virtual, stages, p.shape[0] // (stages * virtual), *p.shape[1:])
        return chunks.swapaxes(0, 1)
    return jax.tree.map(split, layer_params)


def timetable(schedule: Schedule) -> dict[str, np.ndarray]:
    """The static schedule, [ticks, stages] each: which microbatch a stage works on at a tick, on which
    round of the ring, and whether that is real work (not the bubble); and [ticks]: whether stage 0
    takes a fresh microbatch."""
    S, V, M = schedule.stages, schedule.virtual, schedule.microbatches
    item = np.arange(schedule.ticks)[:, None] - np.arange(S)[None, :]  # stage s runs item t - s
    real = (item >= 0) & (item < V * M)
    item = np.clip(item, 0, V * M - 1)
    group, within = item // (S * V), item % (S * V)  # microbatches enter in groups of S, each going round V times
    rounds = within // S
    # Stage 0 takes a fresh microbatch at the start of its round 0, else the last stage's output.
    return {"microbatch": group * S + within % S, "round": rounds, "real": real, "fresh": rounds[:, 0] == 0}


def pipeline(schedule: Schedule, for_microbatch: Callable[[Any, jax.Array], Any] | None = None) -> RunLayers:
    """A ``RunLayers`` that pipelines the stack as ``schedule`` says; ``for_microbatch(layer_params,
    m)``, if given, specializes a stage's layers to microbatch m (its dropout masks)."""
    S, V, M = schedule.stages, schedule.virtual, schedule.microbatches
    specialize = for_microbatch or (lambda params, _: params)
    table = timetable(schedule)
    finals = [int(np.flatnonzero(table["real"][:, -1] & (table["round"][:, -1] == V - 1)
                                 & (table["microbatch"][:, -1] == m))[0]) for m in range(M)]

    def run(layer: Any, layer_params: Any, x: Any) -> Any:
        staged = by_stage(layer_params, S, V)

        def stage(params: Any, h: Any, m: jax.Array, r: jax.Array) -> Any:
            # The one chunk is loop-invariant, so autodiff keeps no copy of it per tick; a round's chunk
            # (V > 1) is selected anew when the stage is recomputed (stage_remat, which V > 1 needs).
            chunk = jax.tree.map(lambda p: p[0] if V == 1 else jax.lax.dynamic_index_in_dim(p, r, keepdims=False),
                                 params)
            return scan_layers(layer, specialize(chunk, m), h)

        if schedule.stage_remat:
            stage = jax.checkpoint(stage, prevent_cse=False)
        run_stages = jax.vmap(stage, spmd_axis_name="stage")
        inputs = jax.tree.map(lambda a: split_microbatches(jnp.asarray(a), M), x)
        microbatch, rounds = jnp.asarray(table["microbatch"]), jnp.asarray(table["round"])

        def tick(state: Any, tick_feed: tuple[jax.Array, Any, jax.Array]) -> tuple[Any, Any]:
            t, feed, fresh = tick_feed
            done = run_stages(staged, state, microbatch[t], rounds[t])
            incoming = jax.tree.map(lambda f, d: jnp.where(fresh, f, d[-1]), feed, done)
            state = jax.tree.map(lambda i, d: jnp.concatenate([i[None], d[:-1]], axis=0), incoming, done)
            return _stage_state(state), jax.tree.map(lambda d: d[-1], done)

        # What stage 0 may take after each tick: the next tick's fresh microbatch (past the last, a repeat).
        following = np.minimum(np.arange(1, schedule.ticks + 1), schedule.ticks - 1)
        feeds = jax.tree.map(lambda a: a[table["microbatch"][following, 0]], inputs)
        first = jax.tree.map(lambda a: jnp.concatenate([a[:1], jnp.zeros((S - 1, *a.shape[1:]), a.dtype)]), inputs)
        _, finished = jax.lax.scan(tick, _stage_state(first),
                                   (jnp.arange(schedule.ticks), feeds, jnp.asarray(table["fresh"][following])))
        out = jax.tree.map(lambda f: merge_microbatches(f[np.asarray(finals)]), finished)
        return _spread(out) if schedule.head_spread else out

    return run
