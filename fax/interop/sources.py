"""Where commands that read a model get it: a run directory, or a Hugging Face folder given as
``hf:DIR`` (``fax generate``, ``serve``, ``infer``, ``eval`` take either), and the check that a
dataset speaks a checkpoint's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from fax.config import Config, ConfigError, run_config
from fax.data import HFTokenizer
from fax.interop.hf import Params, import_params
from fax.interop.hf_config import HF, hf_folder, model_config, read_config
from fax.params import param_layout, run_params


def absolute_source(source: str | Path) -> str:
    """A run directory or ``hf:DIR`` as an absolute path (what another process, elsewhere, can open)."""
    folder = hf_folder(source)
    return f"{HF}{folder.absolute()}" if folder else str(Path(source).absolute())


def source_config(source: str | Path) -> Config:
    """What commands that read a model take (``fax generate``, ``serve``, ``infer``, ``eval``): a run
    directory's config, or a Hugging Face folder (``hf:DIR``) as a run: its model, fax's defaults,
    ``run_dir`` the source itself (its ``tokenizer.json`` is the run's tokenizer)."""
    folder = hf_folder(source)
    if folder is None:
        return run_config(source)
    try:
        model = model_config(read_config(folder))
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not (folder / HFTokenizer.name).exists():
        raise ConfigError(f"{source}: no {HFTokenizer.name}; fax needs the checkpoint's tokenizer to read and write "
                          "its text")
    return Config(model=model, run_dir=absolute_source(source))


def _token_ids(tokenizer_json: Path) -> Any:
    """What decides a ``tokenizer.json``'s token ids: its model (vocabulary, merges) and added tokens."""
    spec = json.loads(tokenizer_json.read_text())
    return spec.get("model"), spec.get("added_tokens")


def tokenizer_problems(folder: Path, data_path: Path) -> list[str]:
    """A dataset prepared with another tokenizer than the Hugging Face checkpoint in ``folder`` has:
    its token ids would be other text to the model (none when the folder has no tokenizer.json)."""
    theirs, ours = folder / HFTokenizer.name, data_path / HFTokenizer.name
    if not theirs.exists() or ours.exists() and _token_ids(ours) == _token_ids(theirs):
        return []
    what = "another tokenizer" if ours.exists() else "fax's byte tokenizer"
    return [f"data.path={data_path} was prepared with {what}, not the tokenizer of {folder}: its token ids would "
            f"be other text to the model. Prepare the data with the checkpoint's tokenizer (fax prepare FILES "
            f"--out DIR --tokenizer {theirs}), or set data.check_tokenizer=false"]


def source_params(config: Config, mesh: Mesh, step: int | None = None, merged: bool = True) -> tuple[Params, int]:
    """The params of ``config.run_dir`` (``source_config``) on ``mesh``: a run's checkpoint of ``step``
    (default: its latest complete one), or a Hugging Face folder's weights (step 0)."""
    folder = hf_folder(config.run_dir)
    if folder is None:
        return run_params(config.run_dir, config, mesh, step, merged)
    if step:
        raise ConfigError(f"--step {step}: {config.run_dir} is a Hugging Face folder, not a run with checkpoints")
    *_, shardings = param_layout(config, mesh)
    return import_params(folder, config.model, shardings), 0
