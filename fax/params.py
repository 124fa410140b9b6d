"""A run's parameters: how they are laid out on a mesh (model and LoRA adapters), made fresh, merged
for inference, and restored from a run directory's checkpoint. Training and serving both build on it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from fax import models
from fax.checkpoint import Checkpointer, checkpoint_dir
from fax.config import Config, LoraConfig
from fax.models import lora as lora_lib
from fax.parallel import tree_shardings


def init_params(cfg: Config) -> Any:
    """Fresh parameters; under LoRA {"base": ..., "lora": adapters} (the base is replaced when
    training starts from a checkpoint)."""
    params = models.init_params(cfg.model, cfg.seed)
    if not cfg.lora.rank:
        return params
    return {"base": params, "lora": lora_lib.init_adapters(params, cfg.lora.targets, cfg.lora.rank, cfg.seed + 1)}


def param_layout(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any, Any]:
    """The model's graph, and of its parameters (adapters included): shapes, logical axes, shardings."""
    graphdef, abstract_state = models.abstract(cfg.model)
    axes = models.logical_axes(abstract_state)
    if cfg.lora.rank:
        axes = {"base": axes, "lora": lora_lib.adapter_axes(axes, cfg.lora.targets)}
    return graphdef, jax.eval_shape(functools.partial(init_params, cfg)), axes, tree_shardings(axes, mesh)


def trainable(params: Any, lora: LoraConfig) -> Any:
    """What the optimizer updates: the adapters under LoRA, else every parameter."""
    return params["lora"] if lora.rank else params


def with_trainable(params: Any, updated: Any, lora: LoraConfig) -> Any:
    return {**params, "lora": updated} if lora.rank else updated


def model_params(params: Any, lora: LoraConfig, dropout_key: jax.Array | None = None) -> Any:
    """The weights the model reads: under LoRA the base with its adapters merged in, or in training
    (given the step's ``dropout_key``) attached to it, so that they apply dropout to their inputs and
    the frozen base gets no weight gradient."""
    if not lora.rank:
        return params
    if dropout_key is None:
        return lora_lib.merge(params["base"], params["lora"], lora.scale)
    return lora_lib.attach(params["base"], params["lora"], lora.scale, lora.dropout, dropout_key)


def run_params(run_dir: str | Path, config: Config, mesh: Mesh, step: int | None = None,
               merged: bool = True) -> tuple[Any, int]:
    """A run's params of ``step`` (default: its latest complete checkpoint), restored onto ``mesh``;
    LoRA adapters come merged into their weights unless ``merged`` is False."""
    ckpt = Checkpointer(checkpoint_dir(run_dir, config.checkpoint), read_only=True)
    step = ckpt.complete_step(step, run_dir)
    _, target, _, shardings = param_layout(config, mesh)
    params = ckpt.restore_params(step, target, shardings)
    return (model_params(params, config.lora) if merged else params), step
