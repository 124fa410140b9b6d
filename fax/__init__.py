"""fax: train and serve large language models with JAX over a device mesh."""

from fax.config import Config, ConfigError, apply_overrides, load_config
from fax.trainer import Trainer

__all__ = ["Config", "ConfigError", "Trainer", "apply_overrides", "load_config"]
