"""Hugging Face interop, offline: GPT-2 and Llama-layout checkpoints (Llama 2/3, Mistral, Qwen2, Qwen3;
``config.json`` + ``*.safetensors``) in and out of fax, read and written with ``safetensors`` alone (no
torch); ``hf_config`` reads and writes the configs.

One table per family ties every fax parameter to the HF tensor (or the column range of a fused
tensor, GPT-2's ``c_attn``) it comes from, with the transpose and reshape between the layouts; import
and export both read the same table. Import builds each parameter straight into its sharding on the
current mesh, one device's slice at a time, so no host ever holds a full copy of a sharded model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from fax import models
from fax.checkpoint import COMPUTE_ONLY_MODEL_KEYS
from fax.config import run_config
from fax.data import HFTokenizer, chat, copy_tokenizer
from fax.models import ModelConfig
from fax.models.transformer import subtree
from fax.params import run_params
from fax.parallel import ParallelConfig, make_mesh
from fax.interop.hf_config import HF, family, hf_config, model_config, model_type, read_config
from fax.interop.hf_ties import Tie, ties

__all__ = ["export_adapters", "export_params", "export_run", "family", "hf_config", "import_params", "init_model",
           "model_config", "model_type", "read_config", "ties", "token_ids"]

Params = dict[str, Any]
EXPORT_DTYPES = ("float32", "bfloat16")
MAX_SHARD_BYTES = 5 * 2 ** 30  # the largest safetensors file an export writes (Hugging Face's default: 5 GB)
FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors dtypes fax reads
DERIVED = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved, recomputed from the config


class SafetensorsDir:
    """The tensors of every ``*.safetensors`` file in a directory, read one tensor at a time."""

    def __init__(self, hf_dir: str | Path):
        self.files, self.headers = {}, {}  # name -> file; name -> (shape, dtype) as stored
        for path in sorted(Path(hf_dir).glob("*.safetensors")):
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    stored = f.get_slice(name)
                    self.files[name], self.headers[name] = path, (tuple(stored.get_shape()), stored.get_dtype())
        if not self.files:
            raise ValueError(f"{hf_dir}: no *.safetensors files (fax never reads pickled .bin checkpoints)")
        self.opened: dict[tuple[Path, str], Any] = {}  # (file, framework) -> its open reader

    def find(self, name: str) -> str | None:
        """The stored name: as given, or without the ``transformer.``/``model.`` prefix (a bare base model)."""
        bare = name.split(".", 1)[1] if name.startswith(("transformer.", "model.")) else name
        return next((n for n in (name, bare) if n in self.files), None)

    def region(self, name: str, region: tuple[slice, ...] | None) -> np.ndarray:
        """A region of a stored tensor (None: all of it) as float32, reading only its bytes. numpy has no
        bfloat16 (most published checkpoints): those go through jax on the host CPU."""
        path, (shape, dtype) = self.files[name], self.headers[name]
        key = (path, "flax" if dtype == "BF16" else "numpy")
        if key not in self.opened:
            self.opened[key] = safe_open(path, framework=key[1])
        stored = self.opened[key].get_slice(name)
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(stored[region or tuple(slice(None) for _ in shape)], np.float32)


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_model(init_from: str, model: ModelConfig) -> ModelConfig:
    """The model an ``init_from=hf:DIR`` run trains: the checkpoint's shape, ``model``'s compute settings."""
    shape = model_config(read_config(init_from_dir(init_from)))
    return shape.replace(**{k: getattr(model, k) for k in COMPUTE_ONLY_MODEL_KEYS})


def init_from_dir(init_from: str) -> str:
    if not init_from.startswith(HF):
        raise ValueError(f"init_from={init_from!r}: expected hf:/path/to/a/hugging-face/model/dir")
    return init_from[3:]


def tensor_problems(store: SafetensorsDir, cfg: ModelConfig) -> list[str]:
    """What keeps a checkpoint's tensors from being exactly the model ``cfg``: tensors missing, of
    another shape or of a non-float dtype, and tensors the model has no place for (a bias of another
    family, say: dropped, they would change the logits without a word)."""
    wanted = {name: tie.stored_shape for tie in ties(cfg) for _, name in tie.entries()}
    found = {name: store.find(name) for name in wanted}
    problems = []
    missing = [name for name, stored in found.items() if stored is None]
    if missing:
        problems.append(f"tensors missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    wrong = [f"{stored} is {list(store.headers[stored][0])}, the model needs {list(wanted[name])}"
             for name, stored in found.items() if stored is not None and store.headers[stored][0] != wanted[name]]
    wrong += [f"{stored} is {store.headers[stored][1]} (quantized?); fax reads {', '.join(FLOAT_DTYPES)}"
              for stored in found.values() if stored is not None and store.headers[stored][1] not in FLOAT_DTYPES]
    problems += wrong[:4] + ([f"{len(wrong) - 4} more tensors like these"] if len(wrong) > 4 else [])
    unread = sorted(set(store.files) - set(found.values()) - {n for n in store.files if n.endswith(DERIVED)})
    if unread:
        problems.append(f"tensors the model has no place for: {', '.join(unread[:5])}"
                        f"{f' and {len(unread) - 5} more' if len(unread) > 5 else ''}")
    return problems


def import_params(hf_dir: str | Path, cfg: ModelConfig, shardings: Params) -> Params:
    """fax params from a HF directory, each created in its sharding from the slices its devices hold."""
    store = SafetensorsDir(hf_dir)
    problems = tensor_problems(store, cfg)
    if problems:
        raise ValueError(f"{hf_dir}: cannot import it as a {model_type(cfg)} model: " + "; ".join(problems))
    params: Params = {}
    for tie in ties(cfg):
        sharding = subtree(shardings, tie.fax)
        shape = _shapes(cfg)[tie.fax]
        lead = len(tie.leading)  # layers, experts: one stored tensor each

        def piece(index: tuple[slice, ...], tie: Tie = tie, lead: int = lead, unit: tuple = shape[lead:]) -> np.ndarray:
            def part(at: tuple[int, ...]) -> np.ndarray:  # the stored tensors under ``at``
                if len(at) == lead:
                    name = store.find(tie.name(at))
                    return tie.piece(lambda region: store.region(name, region), unit, index[lead:])
                return np.stack([part((*at, k)) for k in range(tie.leading[len(at)])[index[len(at)]]])
            return part(())

        _set(params, tie.fax, array_from_pieces(shape, sharding, piece))
    return params


def array_from_pieces(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                      piece: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """``jax.make_array_from_callback``, one piece at a time: each is on its devices before the next is
    read, so the host holds one device's slice, not every local device's at once. Replicas share a read."""
    indices = sharding.addressable_devices_indices_map(shape)
    by_index: dict[tuple, list[jax.Device]] = {}
    for device, index in indices.items():
        by_index.setdefault(tuple(s.indices(n) for s, n in zip(index, shape)), []).append(device)
    arrays = {}
    for key, devices in by_index.items():
        values = piece(tuple(slice(*k) for k in key))
        for device in devices:
            arrays[device] = jax.block_until_ready(jax.device_put(values, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in indices])


@functools.cache
def _shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every fax parameter."""
    _, state = models.abstract(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}


class SafetensorsShards:
    """Tensors written to ``model-0000k-of-0000n.safetensors`` files of at most ``max_bytes`` each (one
    ``model.safetensors`` when they fit in one), with ``model.safetensors.index.json`` when there are
    several: each file is written once it is full, so a host holds one file's tensors at a time."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # the tensor names of each file written, in order
        self.total = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_bytes:
            self._write()
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes
        self.total += tensor.nbytes

    def _write(self) -> None:
        save_file(self.pending, str(self.out / f"part-{len(self.files)}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._write()
        if len(self.files) == 1:
            (self.out / "part-0.safetensors").replace(self.out / "model.safetensors")
            return
        names = [f"model-{k + 1:05d}-of-{len(self.files):05d}.safetensors" for k in range(len(self.files))]
        for k, name in enumerate(names):
            (self.out / f"part-{k}.safetensors").replace(self.out / name)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {tensor: name for name, tensors in zip(names, self.files) for tensor in tensors}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an export writes its tensors in; ValueError for one it does not."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: fax exports {', '.join(EXPORT_DTYPES)}")
    return jax.numpy.dtype(dtype)


def export_params(params: Params, cfg: ModelConfig, out_dir: str | Path, dtype: str = "float32",
                  max_shard_bytes: int = MAX_SHARD_BYTES, token_ids: dict[str, Any] | None = None,
                  on_tensor: Callable[[str], None] | None = None) -> Path:
    """Write ``params`` (arrays of any sharding) as a HF directory that ``transformers`` loads: its
    tensors in ``dtype`` (float32 or bfloat16), in files of at most ``max_shard_bytes``, read from the
    devices one layer at a time; ``token_ids`` (bos/eos/pad ids) go into config.json and
    generation_config.json."""
    as_stored = export_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer, fused = SafetensorsShards(out, max_shard_bytes), {}
    for tie in ties(cfg):
        value = subtree(params, tie.fax)
        for index, name in tie.entries():
            part = tie.to_hf(np.asarray(jax.device_get(value[index]), np.float32))
            if tie.cols:  # GPT-2's c_attn: written once its q, k and v columns are all in
                whole, filled = fused.setdefault(name, (np.zeros(tie.stored_shape, np.float32), [0]))
                whole[..., tie.cols[0]:tie.cols[1]] = part
                filled[0] += tie.cols[1] - tie.cols[0]
                if filled[0] == tie.fused_width:
                    writer.add(name, whole.astype(as_stored))
                    del fused[name]
            else:
                writer.add(name, np.ascontiguousarray(part).astype(as_stored))
            if on_tensor:
                on_tensor(name)
    writer.close()
    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    config = hf_config(cfg) | {"torch_dtype": dtype} | ids
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if ids:
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
    return out


def token_ids(tokenizer: HFTokenizer) -> dict[str, Any]:
    """The ids config.json and generation_config.json name: bos and pad where the tokenizer names them,
    eos: its end of text and the end of an assistant's turn (Llama 3's ``<|eot_id|>``)."""
    named = {kind: tokenizer.token_id(tokenizer.special_tokens[f"{kind}_token"])
             for kind in ("bos", "pad") if tokenizer.special_tokens.get(f"{kind}_token")}
    ends = list(dict.fromkeys((tokenizer.eos_id, *chat.layout(tokenizer).end_ids)))
    return {"bos_token_id": named.get("bos"), "eos_token_id": ends if len(ends) > 1 else ends[0],
            "pad_token_id": named.get("pad")}


def _run_on_local_devices(run_dir: str | Path, step: int | None, merged: bool) -> tuple[Any, Params, int]:
    """A run's params split over this host's devices (fsdp over as many as divide d_model), so that no
    device holds the whole model; an export then reads one layer's tensor at a time to the host."""
    config = run_config(run_dir)
    devices = jax.local_devices()
    fsdp = max(n for n in range(1, len(devices) + 1) if config.model.d_model % n == 0)
    params, step = run_params(run_dir, config, make_mesh(ParallelConfig(fsdp=fsdp), devices[:fsdp]), step, merged)
    return config, params, step


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[Path, int]:
    """A run directory's checkpoint (default: the latest; LoRA adapters merged in) as a HF directory,
    with the run's tokenizer and chat template where it has a Hugging Face one (and its token ids in the
    configs); returns it and the step."""
    model_type(run_config(run_dir).model)  # fails before anything is read
    export_dtype(dtype)
    tokenizer = Path(run_dir) / HFTokenizer.name  # the run's copy; fax's byte tokenizer has no Hugging Face form
    ids = token_ids(HFTokenizer(tokenizer)) if tokenizer.exists() else None
    config, params, step = _run_on_local_devices(run_dir, step, merged=True)
    out = export_params(params, config.model, out_dir, dtype, max_shard_bytes, ids)
    if tokenizer.exists():
        copy_tokenizer(tokenizer, out)
    return out, step


def export_adapters(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> tuple[Path, int]:
    """The LoRA adapters of a run alone, in PEFT's layout (what ``peft.PeftModel.from_pretrained`` loads
    onto the transformers base model, and serving engines take): ``adapter_model.safetensors``, each
    adapted projection's ``lora_A.weight`` [rank, in] and ``lora_B.weight`` [out, rank] per layer, and
    ``adapter_config.json``. Llama-layout models only: GPT-2 fuses q, k and v into one tensor, whose
    parts PEFT cannot adapt apart."""
    config = run_config(run_dir)
    if not config.lora.rank:
        raise ValueError(f"{run_dir} was not trained with LoRA (lora.rank=0): export the whole model instead")
    if family(config.model) == "gpt2":
        raise ValueError("PEFT's layout has no LoRA on part of GPT-2's fused q/k/v tensor (c_attn): export the "
                         "merged model instead (fax export without --adapters-only)")
    config, params, step = _run_on_local_devices(run_dir, step, merged=False)
    modules = {tie.fax[1:]: tie.hf.removesuffix(".weight") for tie in ties(config.model) if tie.fax[0] == "blocks"}
    tensors = {}
    for target, ab in params["lora"].items():
        module = modules[tuple(target.split("."))]
        a, b = (np.asarray(jax.device_get(ab[k]), np.float32) for k in ("a", "b"))
        for i in range(config.model.n_layers):
            name = f"base_model.model.{module.format(i=i)}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = hf_folder_of(config.init_from)
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora.rank, "lora_alpha": config.lora.alpha,
         "lora_dropout": config.lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
         "inference_mode": True, "base_model_name_or_path": base,
         "target_modules": sorted({modules[tuple(t.split("."))].rsplit(".", 1)[-1] for t in config.lora.targets})},
        indent=2))
    return out, step


def hf_folder_of(init_from: str) -> str | None:
    """The Hugging Face folder a run started from (``init_from=hf:DIR``), absolute; None if none."""
    return str(Path(init_from[len(HF):]).absolute()) if init_from.startswith(HF) else None
