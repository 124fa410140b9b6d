"""fax: train and serve large language models with JAX over a device mesh.

``fax.Config``, ``fax.load_config`` and ``fax.Trainer`` are the Python entry points; the trainer
(and with it jax) loads on first use, so that reading settings and ``fax --help`` stay fast.
"""

from typing import Any

from fax.config import Config, ConfigError, apply_overrides, load_config

__all__ = ["Config", "ConfigError", "Trainer", "apply_overrides", "load_config"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from fax.train.loop import Trainer

        return Trainer
    raise AttributeError(f"module 'fax' has no attribute {name!r}")
