"""How a model is laid out on devices: meshes and logical sharding rules."""

from parallel.mesh import MESH_AXES, ParallelConfig, make_mesh
from parallel.rules import (BATCH_AXES, DEFAULT_RULES, activation_resolver, logical_sharding,
                            logical_to_spec, optimizer_shardings, replicated, tree_shardings)

__all__ = ["BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "ParallelConfig", "activation_resolver",
           "logical_sharding", "logical_to_spec", "make_mesh", "optimizer_shardings", "replicated",
           "tree_shardings"]
