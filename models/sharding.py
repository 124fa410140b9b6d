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


@contextlib.contextmanager
def activation_sharding(resolver: Resolver | None) -> Iterator[None]:
    """Install ``resolver`` for the activations traced inside this block."""
    token = _resolver.set(resolver)
    try:
        yield
    finally:
        _resolver.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    resolver = _resolver.get()
    if resolver is None:
        return x
    return jax.lax.with_sharding_constraint(x, resolver(axes))
