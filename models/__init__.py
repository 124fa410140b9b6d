"""Flax NNX decoder-only language models annotated with logical axis names."""

from models.config import ModelConfig, param_count, train_flops_per_token
from models.presets import preset, preset_names
from models.layers import CACHE_AXES, KVCache
from models.transformer import (SERVING_AXES, DecoderLM, RunLayers, ServingWeights, abstract, apply, apply_cached,
                                apply_hidden, build, empty_cache, init_params, logical_axes, project, scan_layers,
                                serving_weights, unstack_layers)

__all__ = ["CACHE_AXES", "SERVING_AXES", "DecoderLM", "KVCache", "ModelConfig", "RunLayers", "ServingWeights", "abstract",
           "apply", "apply_cached", "apply_hidden", "build", "empty_cache", "init_params", "logical_axes", "project",
           "scan_layers", "serving_weights", "unstack_layers", "param_count", "preset", "preset_names",
           "train_flops_per_token"]
