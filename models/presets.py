"""Named model shapes, read from presets.yaml."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from fax.models.config import ModelConfig


@functools.cache
def _presets() -> dict[str, dict]:
    return yaml.safe_load((Path(__file__).with_name("presets.yaml")).read_text())


def preset_names() -> list[str]:
    return list(_presets())


def preset(name: str) -> ModelConfig:
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(presets)}")
    return ModelConfig(**{k: v for k, v in presets[name].items() if k != "about"})


def preset_about(name: str) -> str:
    """What a preset stands for where its shape is not the whole story (what of the real model is not built)."""
    return _presets()[name].get("about", "")
