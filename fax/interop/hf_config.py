"""Hugging Face ``config.json`` <-> fax ``ModelConfig``: GPT-2 and the Llama-like families (Llama 2/3,
Mistral, Qwen2, Qwen3), every key that changes the computation read or refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fax.models import ModelConfig
from fax.models.config import is_moe_layer, layer_window, mixed_layers

HF = "hf:"  # what names a Hugging Face folder where a run directory or a model preset may go
# Mixtures of experts of Llama's layout: Mixtral (Mistral's), Qwen2-MoE (Qwen2's, a gated shared expert),
# Qwen3-MoE (Qwen3's); every layer's MLP routed by a softmax over the experts
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh GELU fax's GPT blocks use
# Model types of Llama's layout (Qwen: q/k/v biases, q/k norms; Gemma: GeGLU, 1 + w norms, scaled embeddings)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", *MOE)
GEMMA = {"activation": "geglu", "norm_plus_one": True, "embed_scale": True}  # what makes a Llama layout Gemma
TANH_GELU = ("gelu", "gelu_pytorch_tanh", "gelu_new")  # Gemma's hidden_act: its legacy "gelu" means the tanh one
# The config keys of those families fax reads or knows to change nothing in the forward pass (labels, ids,
# output switches, dropouts checked to be 0); any other key is refused by name.
LLAMA_LIKE_KEYS = frozenset({
    "model_type", "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "attention_dropout",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "partial_rotary_factor",
    "pretraining_tp",  # how Meta's training split the matmuls: the same product
    "hidden_activation", "use_bidirectional_attention", "final_logit_softcapping", "attn_logit_softcapping",
    "query_pre_attn_scalar", "cache_implementation",
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "router_aux_loss_coef", "router_jitter_noise", "decoder_sparse_step", "mlp_only_layers",
    "qkv_bias", "output_router_logits",
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "chunk_size_feed_forward",
    "dtype", "torch_dtype", "id2label", "label2id", "initializer_range", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "transformers_version", "use_cache", "tokenizer_class"})


def hf_folder(source: str | Path) -> Path | None:
    """The Hugging Face folder a source names (``hf:DIR``), None for a run directory."""
    return Path(str(source)[len(HF):]) if str(source).startswith(HF) else None


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' (Llama's layout: Llama, Mistral, Qwen2, Qwen3): the HF architecture a fax model
    is, or a ValueError naming what differs."""
    gpt2 = {"norm": "layernorm", "activation": "gelu", "position": "learned", "use_bias": True, "tie_embeddings": True,
            "qkv_bias": False, "qk_norm": False, "norm_plus_one": False, "embed_scale": False}
    llama = {"norm": "rmsnorm", "activation": ("swiglu", "geglu"), "position": "rope", "use_bias": False}
    for name, wanted in (("gpt2", gpt2), ("llama", llama)):
        if all(getattr(cfg, k) in (v if isinstance(v, tuple) else (v,)) for k, v in wanted.items()):
            if name == "gpt2" and (cfg.n_kv_heads != cfg.n_heads or cfg.kv_head_dim * cfg.n_heads != cfg.d_model):
                raise ValueError("a GPT-2 checkpoint needs model.n_kv_heads == model.n_heads and "
                                 "model.head_dim * model.n_heads == model.d_model")
            return name
    raise ValueError(f"no Hugging Face architecture matches model.norm={cfg.norm}, model.activation={cfg.activation}, "
                     f"model.position={cfg.position}, model.use_bias={cfg.use_bias}: GPT-2 is layernorm/gelu/learned/"
                     "bias/tied, Llama is rmsnorm/swiglu/rope/no bias")


def model_type(cfg: ModelConfig) -> str:
    """The HF ``model_type`` a fax model is exported as."""
    if family(cfg) == "gpt2":
        return "gpt2"
    gemma = [k for k, v in GEMMA.items() if getattr(cfg, k) == v]
    if gemma and (len(gemma) < len(GEMMA) or cfg.qk_norm or cfg.qkv_bias):
        raise ValueError(f"{', '.join(f'model.{k}={v}' for k, v in GEMMA.items())} together (Gemma) and nothing "
                         "else of Qwen's match a Hugging Face architecture")
    if gemma and cfg.attention_window and not cfg.post_norms:
        raise ValueError(f"model.attention_window={cfg.attention_window}: Gemma has no attention window (Gemma 2 "
                         "has, with model.post_norms)")
    if gemma:
        return "gemma2" if cfg.post_norms else "gemma"
    if cfg.post_norms or cfg.logit_softcap or cfg.attn_softcap or cfg.query_scale:
        raise ValueError("model.post_norms, model.logit_softcap, model.attn_softcap and model.query_scale are "
                         "Gemma 2's: they match a Hugging Face architecture only with Gemma's settings")
    if cfg.global_every and not (cfg.qk_norm or cfg.qkv_bias):
        raise ValueError(f"model.global_every={cfg.global_every}: Mistral's and Mixtral's window is every layer's; "
                         "Qwen's and Gemma 2's may skip some layers")
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("model.qk_norm with model.qkv_bias matches no Hugging Face architecture (Qwen3 has q/k "
                         "norms, Qwen2 q/k/v biases)")
    if cfg.moe_experts:
        return moe_type(cfg)
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "mistral" if cfg.attention_window else "llama"


def moe_type(cfg: ModelConfig) -> str:
    """The HF ``model_type`` of a mixture of experts, or a ValueError naming what none has."""
    kind = "qwen3_moe" if cfg.qk_norm else "qwen2_moe" if cfg.qkv_bias else "mixtral"
    wrong = [f"model.{k}={getattr(cfg, k)}" for k, ok in (("moe_router", "softmax"), ("moe_route_scale", 1.0))
             if getattr(cfg, k) != ok]
    if kind == "mixtral" and not cfg.moe_norm_topk:
        wrong.append("model.moe_norm_topk=False (Mixtral renormalises its top-k weights)")
    if kind == "mixtral" and mixed_layers(cfg):
        wrong.append("dense blocks beside the mixtures (model.moe_first_dense, model.moe_every: Mixtral has none)")
    if (kind == "qwen2_moe") != bool(cfg.moe_shared_d_ff and cfg.moe_shared_gate):
        wrong.append("a shared expert (Qwen2-MoE has one, with its sigmoid gate, and q/k/v biases; Mixtral and "
                     "Qwen3-MoE none)")
    if wrong:
        raise ValueError(f"no Hugging Face mixture of experts matches {', '.join(wrong)}")
    return kind


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def _unsupported(hf: dict[str, Any], allowed: dict[str, tuple]) -> list[str]:
    return [f"{k}={hf.get(k)!r} (fax supports {', '.join(map(repr, ok))})" for k, ok in allowed.items()
            if hf.get(k) not in ok]


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """The fax model of a HF ``config.json`` (GPT-2, or the Llama-like families ``LLAMA_LIKE``);
    ValueError names what fax cannot express."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        problems = _unsupported(hf, {"activation_function": GPT2_ACTIVATIONS,
                                     "scale_attn_by_inverse_layer_idx": (None, False),
                                     "reorder_and_upcast_attn": (None, False)})
        d = hf["n_embd"]
        cfg = ModelConfig(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], d_model=d, n_layers=hf["n_layer"],
                          n_heads=hf["n_head"], n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                          norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    elif kind in LLAMA_LIKE:
        rope, problems = rope_settings(hf)
        gemma = kind.startswith("gemma")
        problems += _unsupported(hf, {"hidden_act": (None, *TANH_GELU) if gemma else ("silu",), "mlp_bias": (None, False),
                                      "hidden_activation": (None, *TANH_GELU[1:]),
                                      "use_bidirectional_attention": (None, False),
                                      "attention_dropout": (None, 0, 0.0), "partial_rotary_factor": (None, 1, 1.0)})
        problems += _unsupported(hf, {"router_jitter_noise": (None, 0, 0.0)})
        if kind not in ("qwen2", "qwen2_moe") and hf.get("attention_bias"):
            problems.append("attention_bias=True (biases on all four attention projections: fax has them on "
                            "q, k and v alone, as Qwen2)")
        unknown = sorted(set(hf) - LLAMA_LIKE_KEYS)
        if unknown:
            problems.append(f"config keys fax does not know: {', '.join(unknown)} (each may change the "
                            "computation; a model fax has not been checked against is refused, not guessed)")
        cfg = ModelConfig(vocab_size=hf["vocab_size"], **window_settings(hf),
                          d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                          n_heads=hf["num_attention_heads"],
                          n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                          head_dim=hf.get("head_dim") or 0, d_ff=hf["intermediate_size"], norm="rmsnorm",
                          activation="geglu" if gemma else "swiglu", position="rope", use_bias=False,
                          qkv_bias=kind in ("qwen2", "qwen2_moe"), qk_norm=kind in ("qwen3", "qwen3_moe"),
                          norm_plus_one=gemma, embed_scale=gemma,
                          tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
                          norm_eps=hf.get("rms_norm_eps", 1e-6), **rope, **gemma2_settings(hf), **moe_settings(hf))
    else:
        raise ValueError(f"model_type {kind!r} is not supported; fax imports {', '.join(('gpt2',) + LLAMA_LIKE)} "
                         "checkpoints")
    if problems:
        raise ValueError(f"cannot import this {kind} checkpoint: " + "; ".join(problems))
    return cfg


def moe_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """A mixture of experts' ``model.moe_*`` settings (Mixtral's experts are ``intermediate_size`` wide;
    Qwen's ``moe_intermediate_size``, beside Qwen2-MoE's gated shared expert)."""
    kind = hf["model_type"]
    if kind not in MOE:
        return {}
    qwen = kind != "mixtral"
    return moe_layers(hf) | {"moe_experts": hf.get("num_local_experts") or hf["num_experts"], "moe_top_k": hf["num_experts_per_tok"],
            "moe_d_ff": hf["moe_intermediate_size"] if qwen else 0,
            "moe_shared_d_ff": hf.get("shared_expert_intermediate_size") or 0 if kind == "qwen2_moe" else 0,
            "moe_shared_gate": kind == "qwen2_moe" and bool(hf.get("shared_expert_intermediate_size")),
            "moe_norm_topk": bool(hf.get("norm_topk_prob", False)) if qwen else True,
            "moe_aux_loss": float(hf.get("router_aux_loss_coef", 0.0))}


def moe_layers(hf: dict[str, Any]) -> dict[str, int]:
    """``model.moe_first_dense`` and ``moe_every`` of a Qwen-MoE config, whose layer i is a mixture where
    (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers; ValueError for a pattern fax's
    stack (dense first blocks, then groups each ending in a mixture) cannot hold."""
    n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
    moe = [i for i in range(n) if (i + 1) % step == 0 and i not in (hf.get("mlp_only_layers") or ())]
    every = moe[1] - moe[0] if len(moe) > 1 else n - moe[0] if moe else 1
    first = moe[0] + 1 - every if moe else 0
    shape = ModelConfig(n_layers=n, moe_experts=1, moe_first_dense=first, moe_every=every)
    if not moe or first < 0 or (n - first) % every or [i for i in range(n) if is_moe_layer(shape, i)] != moe:
        raise ValueError(f"its mixtures are layers {moe} (decoder_sparse_step={step}, mlp_only_layers="
                         f"{hf.get('mlp_only_layers')}); fax's are the last of each group of model.moe_every layers "
                         "after model.moe_first_dense dense ones")
    return {"moe_first_dense": first, "moe_every": every}


def gemma2_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's norms after each sublayer, soft-capped logits and scores, and query scaling."""
    if hf["model_type"] != "gemma2":
        return {}
    return {"post_norms": True, "logit_softcap": float(hf.get("final_logit_softcapping") or 0.0),
            "attn_softcap": float(hf.get("attn_logit_softcapping") or 0.0),
            "query_scale": float(hf.get("query_pre_attn_scalar") or 0.0)}


def rope_settings(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``model.rope_*`` settings of a config's RoPE (``rope_parameters``, or the older
    ``rope_scaling`` with ``rope_type`` or ``type``), and what fax cannot express."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    settings = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return settings, []
    if kind == "linear":
        return settings | {"rope_scaling": "linear", "rope_factor": float(rope["factor"])}, []
    if kind == "llama3":
        return settings | {"rope_scaling": "llama3", "rope_factor": float(rope["factor"]),
                           "rope_low_freq_factor": float(rope["low_freq_factor"]),
                           "rope_high_freq_factor": float(rope["high_freq_factor"]),
                           "rope_original_len": int(rope["original_max_position_embeddings"])}, []
    return settings, [f"rope scaling {kind!r} (fax implements default, linear and llama3 RoPE)"]


def windowed_layers(hf: dict[str, Any]) -> list[bool]:
    """Which layers attend to a window of ``sliding_window`` tokens: Mistral's and Mixtral's all of them,
    Qwen's and Gemma 2's those ``layer_types`` names (or Qwen's ``use_sliding_window`` from
    ``max_window_layers`` on)."""
    n = hf["num_hidden_layers"]
    if not hf.get("sliding_window"):
        return [False] * n
    if hf["model_type"] in ("mistral", "mixtral"):
        return [True] * n
    if hf.get("layer_types"):
        return [kind == "sliding_attention" for kind in hf["layer_types"]]
    return [bool(hf.get("use_sliding_window")) and i >= (hf.get("max_window_layers") or 0) for i in range(n)]


def window_settings(hf: dict[str, Any]) -> dict[str, int]:
    """The context, ``model.attention_window`` and ``model.global_every``: the window where every layer
    has it, or all but every k-th (Gemma 2's every other layer); where other layers have it the context
    is cut to the window, within which windowed attention is causal attention."""
    context, windowed = hf["max_position_embeddings"], windowed_layers(hf)
    if not any(windowed):
        return {"max_seq_len": context}
    window, n = int(hf["sliding_window"]), len(windowed)
    for every in range(n + 1):  # 0: every layer has the window; k: all but every k-th (``layer_window``)
        shape = ModelConfig(n_layers=n, attention_window=window, global_every=every)
        if every != 1 and [bool(layer_window(shape, i)) for i in range(n)] == windowed:
            return {"max_seq_len": context, "attention_window": window, "global_every": every}
    return {"max_seq_len": min(context, window)}


def layer_types(cfg: ModelConfig) -> list[str]:
    """Each layer's attention as Qwen's and Gemma 2's configs name it."""
    return ["sliding_attention" if layer_window(cfg, i) else "full_attention" for i in range(cfg.n_layers)]


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if family(cfg) == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "tie_word_embeddings": True, "torch_dtype": "float32"}
    kind = model_type(cfg)
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[kind]
    config = {"model_type": kind, "architectures": [architecture], "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.max_seq_len, "hidden_size": cfg.d_model,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.kv_head_dim, "intermediate_size": cfg.d_ff,
              "hidden_act": "gelu_pytorch_tanh" if kind.startswith("gemma") else "silu", "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if kind not in ("qwen2", "qwen2_moe"):
        config |= {"attention_bias": False} | ({"mlp_bias": False} if kind == "llama" else {})
    window = cfg.attention_window or None
    if kind in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "mistral"):
        config |= {"sliding_window": window} | ({} if kind in ("mixtral", "mistral") else {
            "use_sliding_window": bool(window), "max_window_layers": 0, "layer_types": layer_types(cfg)})
    if kind == "mixtral":
        config |= {"num_local_experts": cfg.moe_experts, "intermediate_size": cfg.expert_d_ff}
    elif kind in MOE:
        config |= {"num_experts": cfg.moe_experts, "moe_intermediate_size": cfg.expert_d_ff,
                   "norm_topk_prob": cfg.moe_norm_topk}
        step = cfg.moe_every if not cfg.moe_first_dense else 1  # else the dense layers listed
        config |= {"decoder_sparse_step": step, "mlp_only_layers": [
            i for i in range(cfg.n_layers) if (i + 1) % step == 0 and not is_moe_layer(cfg, i)]}
    if kind == "qwen2_moe":
        config |= {"shared_expert_intermediate_size": cfg.moe_shared_d_ff, "qkv_bias": True}
    if kind in MOE:
        config |= {"num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_loss,
                   "router_jitter_noise": 0.0}
    if kind == "gemma2":  # without a window every layer attends to the whole context (a window as long as it)
        config |= {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": int(cfg.query_scale or cfg.kv_head_dim),
                   "final_logit_softcapping": cfg.logit_softcap or None, "attn_logit_softcapping": cfg.attn_softcap or None,
                   "sliding_window": window or cfg.max_seq_len, "layer_types": layer_types(cfg)}
    if cfg.rope_scaling != "none":
        config["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor} | (
            {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
             "original_max_position_embeddings": cfg.rope_original_len} if cfg.rope_scaling == "llama3" else {})
    return config
