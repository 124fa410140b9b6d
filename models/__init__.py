"""Flax NNX decoder-only language models annotated with logical axis names."""

from models.config import ModelConfig, param_count, train_flops_per_token
from models.presets import preset, preset_names
from models.transformer import (CACHE_LOGICAL_AXES, DecoderLM, abstract, apply, apply_cached, build, empty_cache,
                                init_params, logical_axes)

__all__ = ["CACHE_LOGICAL_AXES", "DecoderLM", "ModelConfig", "abstract", "apply", "apply_cached", "build",
           "empty_cache", "init_params", "logical_axes",
           "param_count", "preset", "preset_names", "train_flops_per_token"]
