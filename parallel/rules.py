"""Logical axis names -> mesh axes, and the shardings of params, optimizer state and batches."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fax.models.sharding import activation_sharding
from fax.parallel.config import ParallelConfig

Rules = Mapping[str, tuple[str, ...]]

# Each logical axis lists the mesh axes it may be sharded over. A mesh axis already used by an
# earlier dimension of the same array is skipped, so an activation [batch, length, embed] puts
# fsdp on the batch while the [embed, mlp] weight puts it on embed.
DEFAULT_RULES: Rules = {
    "batch": ("data", "fsdp", "expert"),
    "length": ("sequence",),
    "residual_length": ("sequence",),  # the residual stream's, between the blocks (see ``rules_for``)
    "embed": ("fsdp", "expert"),  # the experts' weights: fsdp alone (their experts take the expert axis)
    "exp": ("expert",),  # a mixture of experts' experts
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": (),
    "norm": (),
    "layers": ("stage",),  # consecutive layers per pipeline stage
    "stage": ("stage",),
    "pipelined_batch": ("stage", "data", "fsdp", "expert"),  # a pipeline's output rows: the head spread over the stages
    "replica_batch": ("fsdp", "expert"),  # one data replica's rows (each replica sums its own gradients)
}

BATCH_AXES = ("batch", "length")


def rules_for(parallel: ParallelConfig) -> Rules:
    """The rules a parallel setting asks for: with ``tensor_sequence`` the residual stream is split
    along the sequence over the tensor axis as well (Megatron's sequence parallelism)."""
    if not parallel.tensor_sequence:
        return DEFAULT_RULES
    return {**DEFAULT_RULES, "residual_length": ("sequence", "tensor")}


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have logical names ``axes``."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known axes: {', '.join(rules)}")
        mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding for every leaf of a tree of logical-axis tuples."""
    return jax.tree.map(lambda axes: logical_sharding(axes, mesh, rules), axes_tree, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Optimizer state sharded like the params it mirrors (Adam moments); counters replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def activation_resolver(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """The resolver ``fax.models.sharding.constrain`` uses inside a traced step."""
    return lambda axes: logical_sharding(axes, mesh, rules)


def with_activation_sharding(fn: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Trace ``fn`` with logical activation names resolved against ``mesh`` by ``rules``."""
    resolver = activation_resolver(mesh, rules)

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        with activation_sharding(resolver):
            return fn(*args)
    wrapped.__name__ = getattr(fn, "func", fn).__name__  # a partial's function: the compiled program's name
    return wrapped
