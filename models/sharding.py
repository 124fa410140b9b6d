"""Logical-axis annotations for activations.

Model code names the logical axes of an activation (``batch``, ``length``, ``embed`` ...); the
caller installs a resolver that turns those names into a sharding for the current mesh. Without
a resolver (plain single-device use) the annotations do nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

LogicalAxes = Sequence[str | None]
Resolver = Callable[[LogicalAxes], jax.sharding.Sharding]

_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("fax_resolver", default=None)
_aliases: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("fax_axis_aliases", default={})


@contextlib.contextmanager
def activation_sharding(resolver: Resolver | None) -> Iterator[None]:
    """Install ``resolver`` for the activations traced inside this block."""
    token = _resolver.set(resolver)
    try:
        yield
    finally:
        _resolver.reset(token)


@contextlib.contextmanager
def axis_aliases(aliases: dict[str, str]) -> Iterator[None]:
    """Inside this block, read each logical axis named in ``aliases`` as its alias: how a caller lays
    out the activations of code it runs (a pipeline's LM head: its rows over the stages too) without
    that code knowing. An alias to a name the enclosing block aliases reads as that one's alias."""
    outer = _aliases.get()
    token = _aliases.set({**outer, **{name: outer.get(alias, alias) for name, alias in aliases.items()}})
    try:
        yield
    finally:
        _aliases.reset(token)


def _resolved(axes: LogicalAxes) -> jax.sharding.Sharding:
    aliases = _aliases.get()
    return _resolver.get()(tuple(aliases.get(a, a) if a else a for a in axes))


def platform() -> str:
    """The platform of the devices the traced computation is laid out on (a TPU slice compiled for
    ahead of time from a CPU process: tpu), or else the default backend's."""
    resolver = _resolver.get()
    return jax.default_backend() if resolver is None else resolver(()).mesh.devices.flat[0].platform


def per_device(fn: Callable, in_axes: Sequence[LogicalAxes], out_axes: LogicalAxes) -> Callable:
    """``fn`` run on each device's block of its arguments, split by their logical axes (``jax.shard_map``;
    an axis named None is whole on every device): how a kernel without a sharding rule of its own runs
    on a mesh, or a computation with collectives of its own over ``mesh_axes``. Without a resolver,
    ``fn`` itself."""
    resolver = _resolver.get()
    if resolver is None:
        return fn
    specs = tuple(_resolved(axes).spec for axes in in_axes)
    return jax.shard_map(fn, mesh=resolver(()).mesh, in_specs=specs, out_specs=_resolved(out_axes).spec,
                         check_vma=False)


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes that logical axis ``name`` is split over here, those of more than one device
    (none without a resolver), for the collectives of a function run ``per_device``."""
    if _resolver.get() is None:
        return ()
    sharding = _resolved((name,))
    entry = sharding.spec[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(axis for axis in axes if sharding.mesh.shape[axis] > 1)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    if _resolver.get() is None:
        return x
    return jax.lax.with_sharding_constraint(x, _resolved(axes))
