"""Flax NNX decoder-only language models annotated with logical axis names."""

from models.config import ModelConfig, param_count, train_flops_per_token
from models.presets import preset, preset_names
from models.transformer import DecoderLM, abstract, apply, build, init_params, logical_axes

__all__ = ["DecoderLM", "ModelConfig", "abstract", "apply", "build", "init_params", "logical_axes",
           "param_count", "preset", "preset_names", "train_flops_per_token"]
