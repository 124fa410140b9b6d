"""Flax NNX decoder-only language models annotated with logical axis names.

The shapes (``ModelConfig``, presets, parameter and FLOP counts) import without jax; the model
itself loads on first use of one of its names, so that reading settings stays fast.
"""

import importlib
from typing import Any

from fax.models.config import ModelConfig, param_count, train_flops_per_token
from fax.models.presets import preset, preset_names

_LAZY = {"fax.models.layers": ("CACHE_AXES", "KVCache", "lookup"),
         "fax.models.moe": ("RouterStats",),
         "fax.models.transformer": ("SERVING_AXES", "DecoderLM", "RunLayers", "ServingWeights", "abstract", "apply",
                                    "apply_cached", "apply_hidden", "build", "empty_cache", "init_params",
                                    "LayerGroup", "layer_groups", "logical_axes", "head_logits", "scan_layers", "serving_weights", "unstack_layers")}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["ModelConfig", "param_count", "preset", "preset_names", "train_flops_per_token", *_HOME]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fax.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
