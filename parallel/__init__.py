"""How a model is laid out on devices: meshes, logical sharding rules, pipelines, and the planner.

``ParallelConfig`` imports without jax; the mesh and sharding helpers load on first use.
"""

import importlib
from typing import Any

from fax.parallel.config import MESH_AXES, ParallelConfig

_LAZY = {"fax.parallel.mesh": ("make_mesh",),
         "fax.parallel.rules": ("BATCH_AXES", "DEFAULT_RULES", "activation_resolver", "logical_sharding",
                                "logical_to_spec", "optimizer_shardings", "replicated", "rules_for", "tree_shardings",
                                "with_activation_sharding")}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["MESH_AXES", "ParallelConfig", *_HOME]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fax.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
