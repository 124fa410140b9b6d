"""Hugging Face interop, offline: GPT-2 and Llama checkpoints (``config.json`` + ``*.safetensors``) in
and out of fax, read and written with ``safetensors`` alone (no torch).

One table per family ties every fax parameter to the HF tensor (or the column range of a fused
tensor, GPT-2's ``c_attn``) it comes from, with the transpose and reshape between the layouts; import
and export both read the same table. Import builds each parameter straight into its sharding on the
current mesh, one device's slice at a time, so no host ever holds a full copy of a sharded model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
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
from fax.data import HFTokenizer, copy_tokenizer
from fax.models import ModelConfig
from fax.params import run_params
from fax.parallel import ParallelConfig, make_mesh

Params = dict[str, Any]

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh GELU fax's GPT blocks use


@dataclass(frozen=True)
class Tie:
    """fax parameter ``fax`` (per layer when ``hf`` has ``{i}``) <-> HF tensor ``hf``."""

    fax: tuple[str, ...]
    hf: str
    hf_shape: tuple[int, ...]  # of the HF tensor (or of its column range), as stored
    transpose: bool = False  # torch Linear stores [out, in]
    cols: tuple[int, int] | None = None  # the columns of a fused tensor (last axis)
    fused_width: int = 0  # the fused tensor's last axis

    def to_fax(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        part = tensor[..., self.cols[0]:self.cols[1]] if self.cols else tensor
        return (part.T if self.transpose else part).reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        return value.reshape(self.hf_shape[::-1]).T if self.transpose else value.reshape(self.hf_shape)


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama': the HF architecture a fax model is, or a ValueError naming what differs."""
    gpt2 = {"norm": "layernorm", "activation": "gelu", "position": "learned", "use_bias": True, "tie_embeddings": True}
    llama = {"norm": "rmsnorm", "activation": "swiglu", "position": "rope", "use_bias": False}
    for name, wanted in (("gpt2", gpt2), ("llama", llama)):
        if all(getattr(cfg, k) == v for k, v in wanted.items()):
            if name == "gpt2" and (cfg.n_kv_heads != cfg.n_heads or cfg.kv_head_dim * cfg.n_heads != cfg.d_model):
                raise ValueError("a GPT-2 checkpoint needs model.n_kv_heads == model.n_heads and "
                                 "model.head_dim * model.n_heads == model.d_model")
            return name
    raise ValueError(f"no Hugging Face architecture matches model.norm={cfg.norm}, model.activation={cfg.activation}, "
                     f"model.position={cfg.position}, model.use_bias={cfg.use_bias}: GPT-2 is layernorm/gelu/learned/"
                     "bias/tied, Llama is rmsnorm/swiglu/rope/no bias")


def ties(cfg: ModelConfig) -> list[Tie]:
    d, h, kv, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.kv_head_dim, cfg.d_ff, cfg.vocab_size
    if family(cfg) == "gpt2":
        layer = "transformer.h.{i}."
        out = [Tie(("embed",), "transformer.wte.weight", (v, d)),
               Tie(("pos_embed",), "transformer.wpe.weight", (cfg.max_seq_len, d)),
               Tie(("final_norm", "scale"), "transformer.ln_f.weight", (d,)),
               Tie(("final_norm", "bias"), "transformer.ln_f.bias", (d,))]
        for norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out += [Tie(("blocks", norm, "scale"), f"{layer}{hf_norm}.weight", (d,)),
                    Tie(("blocks", norm, "bias"), f"{layer}{hf_norm}.bias", (d,))]
        for k, (w, b) in enumerate((("wq", "q_bias"), ("wk", "k_bias"), ("wv", "v_bias"))):
            cols = (k * d, (k + 1) * d)
            out += [Tie(("blocks", "attn", w), f"{layer}attn.c_attn.weight", (d, d), cols=cols, fused_width=3 * d),
                    Tie(("blocks", "attn", b), f"{layer}attn.c_attn.bias", (d,), cols=cols, fused_width=3 * d)]
        return out + [Tie(("blocks", "attn", "wo"), f"{layer}attn.c_proj.weight", (d, d)),
                      Tie(("blocks", "attn", "out_bias"), f"{layer}attn.c_proj.bias", (d,)),
                      Tie(("blocks", "mlp", "wi"), f"{layer}mlp.c_fc.weight", (d, f)),
                      Tie(("blocks", "mlp", "in_bias"), f"{layer}mlp.c_fc.bias", (f,)),
                      Tie(("blocks", "mlp", "wo"), f"{layer}mlp.c_proj.weight", (f, d)),
                      Tie(("blocks", "mlp", "out_bias"), f"{layer}mlp.c_proj.bias", (d,))]
    layer = "model.layers.{i}."
    out = [Tie(("embed",), "model.embed_tokens.weight", (v, d)),
           Tie(("final_norm", "scale"), "model.norm.weight", (d,)),
           Tie(("blocks", "attn_norm", "scale"), f"{layer}input_layernorm.weight", (d,)),
           Tie(("blocks", "mlp_norm", "scale"), f"{layer}post_attention_layernorm.weight", (d,)),
           Tie(("blocks", "attn", "wq"), f"{layer}self_attn.q_proj.weight", (h * hd, d), transpose=True),
           Tie(("blocks", "attn", "wk"), f"{layer}self_attn.k_proj.weight", (kv * hd, d), transpose=True),
           Tie(("blocks", "attn", "wv"), f"{layer}self_attn.v_proj.weight", (kv * hd, d), transpose=True),
           Tie(("blocks", "attn", "wo"), f"{layer}self_attn.o_proj.weight", (d, h * hd), transpose=True),
           Tie(("blocks", "mlp", "wg"), f"{layer}mlp.gate_proj.weight", (f, d), transpose=True),
           Tie(("blocks", "mlp", "wi"), f"{layer}mlp.up_proj.weight", (f, d), transpose=True),
           Tie(("blocks", "mlp", "wo"), f"{layer}mlp.down_proj.weight", (d, f), transpose=True)]
    if not cfg.tie_embeddings:
        out.append(Tie(("head",), "lm_head.weight", (v, d), transpose=True))
    return out


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def _unsupported(hf: dict[str, Any], allowed: dict[str, tuple]) -> list[str]:
    return [f"{k}={hf.get(k)!r} (fax supports {', '.join(map(repr, ok))})" for k, ok in allowed.items()
            if hf.get(k) not in ok]


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """The fax model of a HF ``config.json`` (GPT-2 or Llama); ValueError names what fax cannot express."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        problems = _unsupported(hf, {"activation_function": GPT2_ACTIVATIONS,
                                     "scale_attn_by_inverse_layer_idx": (None, False),
                                     "reorder_and_upcast_attn": (None, False)})
        d = hf["n_embd"]
        cfg = ModelConfig(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], d_model=d, n_layers=hf["n_layer"],
                          n_heads=hf["n_head"], n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                          norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    elif kind == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        problems = _unsupported(hf, {"hidden_act": ("silu",), "attention_bias": (None, False),
                                     "mlp_bias": (None, False)})
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope type {rope.get('rope_type')!r} (fax supports plain RoPE)")
        cfg = ModelConfig(vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
                          d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                          n_heads=hf["num_attention_heads"],
                          n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                          head_dim=hf.get("head_dim") or 0, d_ff=hf["intermediate_size"], norm="rmsnorm",
                          activation="swiglu", position="rope", use_bias=False,
                          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                          rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                          norm_eps=hf.get("rms_norm_eps", 1e-6))
    else:
        raise ValueError(f"model_type {kind!r} is not supported; fax imports 'gpt2' and 'llama' checkpoints")
    if problems:
        raise ValueError(f"cannot import this {kind} checkpoint: " + "; ".join(problems))
    return cfg


class SafetensorsDir:
    """The tensors of every ``*.safetensors`` file in a directory, read one tensor at a time."""

    def __init__(self, hf_dir: str | Path):
        self.files = {}
        for path in sorted(Path(hf_dir).glob("*.safetensors")):
            with safe_open(path, framework="numpy") as f:
                self.files.update({name: path for name in f.keys()})
        if not self.files:
            raise ValueError(f"{hf_dir}: no *.safetensors files (fax never reads pickled .bin checkpoints)")
        self.read = functools.lru_cache(maxsize=4)(self._read)  # a tensor serves every shard cut from it

    def find(self, name: str) -> str | None:
        """The stored name: as given, or without the ``transformer.``/``model.`` prefix (a bare base model)."""
        bare = name.split(".", 1)[1] if name.startswith(("transformer.", "model.")) else name
        return next((n for n in (name, bare) if n in self.files), None)

    def _read(self, name: str) -> np.ndarray:
        """As float32. numpy has no bfloat16 (most published checkpoints): those go through jax on the host CPU."""
        with safe_open(self.files[name], framework="numpy") as f:
            if f.get_slice(name).get_dtype() != "BF16":
                return f.get_tensor(name).astype(np.float32)
        with jax.default_device(jax.local_devices(backend="cpu")[0]), \
                safe_open(self.files[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_model(init_from: str, model: ModelConfig) -> ModelConfig:
    """The model an ``init_from=hf:DIR`` run trains: the checkpoint's shape, ``model``'s compute settings."""
    shape = model_config(read_config(init_from_dir(init_from)))
    return shape.replace(**{k: getattr(model, k) for k in COMPUTE_ONLY_MODEL_KEYS})


def init_from_dir(init_from: str) -> str:
    if not init_from.startswith("hf:"):
        raise ValueError(f"init_from={init_from!r}: expected hf:/path/to/a/hugging-face/model/dir")
    return init_from[3:]


def import_params(hf_dir: str | Path, cfg: ModelConfig, shardings: Params) -> Params:
    """fax params from a HF directory, each created in its sharding from the slices its devices hold."""
    store = SafetensorsDir(hf_dir)
    missing = [t.hf for t in ties(cfg) if store.find(t.hf.format(i=0)) is None]
    if missing:
        raise ValueError(f"{hf_dir}: tensors missing for a {family(cfg)} model: {', '.join(missing[:5])}")
    params: Params = {}
    for tie in ties(cfg):
        sharding = _get(shardings, tie.fax)
        layered = "{i}" in tie.hf
        one = _layer_shapes(cfg)[tie.fax]
        shape = ((cfg.n_layers,) if layered else ()) + one

        def piece(index: tuple[slice, ...], tie: Tie = tie, layered: bool = layered, one: tuple = one) -> np.ndarray:
            def layer(i: int) -> np.ndarray:
                return tie.to_fax(store.read(store.find(tie.hf.format(i=i))), one)
            if not layered:
                return layer(0)[index]
            return np.stack([layer(i)[index[1:]] for i in range(cfg.n_layers)[index[0]]])

        _set(params, tie.fax, jax.make_array_from_callback(shape, sharding, piece))
    return params


@functools.cache
def _layer_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every fax parameter, of one layer for the stacked blocks."""
    _, state = models.abstract(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {tuple(k.key for k in path): leaf.shape[1:] if path[0].key == "blocks" else leaf.shape
            for path, leaf in leaves}


def export_params(params: Params, cfg: ModelConfig, out_dir: str | Path,
                  on_tensor: Callable[[str], None] | None = None) -> Path:
    """Write ``params`` (arrays of any sharding) as a HF directory that ``transformers`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for tie in ties(cfg):
        value = np.asarray(jax.device_get(_get(params, tie.fax)), np.float32)
        for i, layer_value in (enumerate(value) if "{i}" in tie.hf else [(0, value)]):
            name = tie.hf.format(i=i)
            part = tie.to_hf(layer_value)
            if tie.cols:
                fused = tensors.setdefault(name, np.zeros((*tie.hf_shape[:-1], tie.fused_width), np.float32))
                fused[..., tie.cols[0]:tie.cols[1]] = part
            else:
                tensors[name] = np.ascontiguousarray(part)
            if on_tensor:
                on_tensor(name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    return out


def _run_on_one_device(run_dir: str | Path, step: int | None, merged: bool) -> tuple[Any, Params, int]:
    config = run_config(run_dir)
    params, step = run_params(run_dir, config, make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]), step, merged)
    return config, params, step


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> tuple[Path, int]:
    """A run directory's checkpoint (default: the latest; LoRA adapters merged in) as a HF directory,
    with the run's tokenizer and chat template where it has a Hugging Face one; returns it and the step."""
    family(run_config(run_dir).model)  # fails before anything is read
    config, params, step = _run_on_one_device(run_dir, step, merged=True)
    out = export_params(params, config.model, out_dir)
    tokenizer = Path(run_dir) / HFTokenizer.name  # the run's copy; fax's byte tokenizer has no Hugging Face form
    if tokenizer.exists():
        copy_tokenizer(tokenizer, out)
    return out, step


def export_adapters(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> tuple[Path, int]:
    """The LoRA adapters of a run alone: ``adapters.safetensors`` (``TARGET.a`` [layers, *inputs, rank],
    ``TARGET.b`` [layers, rank, *outputs]) and ``adapter_config.json`` (rank, alpha, targets, base model)."""

    if not run_config(run_dir).lora.rank:
        raise ValueError(f"{run_dir} was not trained with LoRA (lora.rank=0): export the whole model instead")
    config, params, step = _run_on_one_device(run_dir, step, merged=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{target}.{k}": np.asarray(jax.device_get(v)) for target, ab in params["lora"].items()
               for k, v in ab.items()}, str(out / "adapters.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"rank": config.lora.rank, "alpha": config.lora.alpha, "dropout": config.lora.dropout,
         "targets": list(config.lora.targets), "step": step,
         "base_model": config.to_dict()["model"], "init_from": config.init_from}, indent=2))
    return out, step


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if family(cfg) == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "tie_word_embeddings": True, "torch_dtype": "float32"}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.kv_head_dim, "intermediate_size": cfg.d_ff,
            "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32"}
