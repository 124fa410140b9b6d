"""Model shape: one dataclass shared by the model code, the trainer and (later) the planner.

Parameter counts and FLOPs are computed from the shape alone, so the planner can reason about
175B-parameter models without allocating them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu", "geglu")
GATED = ("swiglu", "geglu")  # MLPs with a gate projection (wg): SiLU or tanh-GELU of it times the up projection
POSITIONS = ("learned", "rope")
ROPE_SCALINGS = ("none", "linear", "llama3")
# The block's tensors a remat policy may keep for the backward pass, tagged by name (checkpoint_name).
REMAT_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "out_proj", "mlpwi", "mlpwo")
# Policies that keep named tensors: (those kept on the device, those offloaded to host memory), as
# MaxText names them; the rest of each layer is recomputed from its input in the backward pass.
NAMED_REMAT = {
    "save_qkv_proj": (("query_proj", "key_proj", "value_proj"), ()),
    "save_out_proj": (("out_proj",), ()),
    "save_dot_except_mlp": (("query_proj", "key_proj", "value_proj", "attention_out", "out_proj"), ()),
    "save_dot_except_mlpwi": (("query_proj", "key_proj", "value_proj", "attention_out", "out_proj", "mlpwo"), ()),
    "offload_qkv_proj": ((), ("query_proj", "key_proj", "value_proj")),  # TPU and GPU: host memory
}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", *NAMED_REMAT)
ROUTERS = ("softmax", "sigmoid")  # Mixtral / Qwen-MoE: softmax then top-k; DeepSeek-V3: sigmoid scores
DISPATCHES = ("dropless", "capacity")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "flash", "blockwise")
# From this many tokens a sequence, auto attention holds no seq x seq scores where no fused kernel runs.
BLOCKWISE_FROM = 2048
TILES = (512, 256, 128)  # block sizes of the flash and blockwise kernels, largest first (the Pallas kernel's: x128)
DTYPES = ("float32", "bfloat16")
# The weights LoRA can adapt, each with its number of input axes (attn.wo reads heads x head_dim).
LORA_TARGETS = {"attn.wq": 1, "attn.wk": 1, "attn.wv": 1, "attn.wo": 2, "mlp.wi": 1, "mlp.wg": 1, "mlp.wo": 1}
TENSOR_SPLIT = ("n_heads", "n_kv_heads", "d_ff", "moe_d_ff", "moe_shared_d_ff", "vocab_size")  # what tensor parallelism divides


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. GPT-2 and Llama are two settings of the same fields."""

    vocab_size: int = 512  # tokens of the embedding and the LM head
    max_seq_len: int = 256  # the context: the longest sequence the model reads
    d_model: int = 128  # width of the residual stream
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads (fewer than n_heads: grouped-query attention)
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 512  # width of the MLP
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (Llama)
    activation: str = "gelu"  # gelu (GPT-2), swiglu (Llama) or geglu (Gemma)
    position: str = "learned"  # learned position embeddings (GPT-2) or rope (Llama)
    use_bias: bool = True  # biases on the projections and the MLP (GPT-2)
    qkv_bias: bool = False  # biases on the query, key and value projections alone (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before RoPE (Qwen3)
    tie_embeddings: bool = True  # the LM head is the token embedding's transpose
    rope_theta: float = 10000.0  # RoPE's base frequency
    # RoPE's frequencies stretched for a context longer than the pretraining one: none; linear (every one
    # divided by rope_factor); llama3 (Llama 3.1's: wavelengths above rope_original_len / rope_low_freq_factor
    # divided, those below rope_original_len / rope_high_freq_factor kept, a smooth blend between)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # how much the frequencies are divided (linear, llama3)
    rope_low_freq_factor: float = 1.0  # llama3: see rope_scaling
    rope_high_freq_factor: float = 4.0  # llama3: see rope_scaling
    rope_original_len: int = 8192  # llama3: the pretraining context
    norm_eps: float = 1e-5  # added to the variance in the norms
    norm_plus_one: bool = False  # the norms scale by 1 + w, w starting at 0 (Gemma)
    embed_scale: bool = False  # the token embeddings are multiplied by sqrt(d_model) (Gemma)
    post_norms: bool = False  # each sublayer's output is normed too, before the residual add (Gemma 2)
    logit_softcap: float = 0.0  # logits become c * tanh(logits / c) (Gemma 2: 30); 0: none
    attn_softcap: float = 0.0  # attention scores capped the same way (Gemma 2: 50; XLA or blockwise attention)
    query_scale: float = 0.0  # scores scaled by query_scale ** -0.5 (Gemma 2's query_pre_attn_scalar); 0: head_dim
    init_std: float = 0.02  # std of the normal init of the weights
    dtype: str = "float32"  # compute dtype (float32, bfloat16); parameters are always float32
    # what the backward pass recomputes: none, full, dots_saveable, dots_with_no_batch_dims_saveable, or a policy
    # that keeps named tensors: save_qkv_proj, save_out_proj, save_dot_except_mlp, save_dot_except_mlpwi,
    # offload_qkv_proj (TPU/GPU: to host memory)
    remat: str = "none"
    attention_window: int = 0  # each token attends to itself and the attention_window - 1 before it (Mistral); 0: all
    global_every: int = 0  # with a window, every global_every-th layer attends to all (Gemma 2: 2); 0: none does
    attention_impl: str = "auto"  # auto (cuDNN on GPUs in 16-bit, Pallas splash on TPUs, else XLA or blockwise), xla, cudnn, flash, blockwise
    # Mixture of experts: every block's MLP becomes moe_experts experts of width moe_d_ff, each token run
    # through moe_top_k of them (0 experts: a dense model)
    moe_experts: int = 0
    # Which blocks: after the first moe_first_dense (dense MLPs of width d_ff; DeepSeek-V3: 3), every
    # moe_every-th one, the others dense
    moe_first_dense: int = 0
    moe_every: int = 1  # 1: every block after the dense first ones; 2: every other (Llama 4 Maverick's interleave)
    moe_top_k: int = 2  # experts per token
    moe_d_ff: int = 0  # width of each routed expert; 0: d_ff
    moe_shared_d_ff: int = 0  # width of the always-on shared expert(s) beside the routed ones (DeepSeek, Qwen-MoE); 0: none
    moe_shared_gate: bool = False  # the shared expert's output scaled by sigmoid(x . w) (Qwen2-MoE)
    moe_router: str = "softmax"  # softmax over the experts then top-k (Mixtral, Qwen), or sigmoid scores (DeepSeek-V3)
    moe_norm_topk: bool = True  # the top-k weights renormalised to sum to 1 (Mixtral, Qwen3-MoE; Qwen2-MoE: false)
    moe_route_scale: float = 1.0  # the top-k weights multiplied by this (DeepSeek-V3: 2.5)
    # dropless: each expert takes every token routed to it (tokens sorted by expert, a grouped matmul);
    # capacity: each expert takes at most moe_capacity_factor x its even share of a sequence's tokens, the
    # rest pass by on the residual stream (reported as moe_dropped)
    moe_dispatch: str = "dropless"
    moe_capacity_factor: float = 1.25  # with moe_dispatch=capacity
    moe_aux_loss: float = 0.01  # weight of the load-balancing loss (Switch: experts x sum of load x mean probability)
    moe_z_loss: float = 0.001  # weight of the router z-loss (mean squared logsumexp of the router logits)
    # What the planner assumes of the busiest expert shard: its tokens over the mean (a dropless step waits
    # for it); routers trained with a balance loss stay near 1.1-1.3 per group of devices
    moe_imbalance: float = 1.2

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def problems(self) -> list[str]:
        """Inconsistent settings, each phrased as the setting to change."""
        out = []
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("position", POSITIONS),
                              ("rope_scaling", ROPE_SCALINGS),
                              ("remat", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS),
                              ("dtype", DTYPES), ("moe_router", ROUTERS), ("moe_dispatch", DISPATCHES)):
            if getattr(self, name) not in allowed:
                out.append(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            out.append(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if not self.head_dim and self.n_heads > 0 and self.d_model % self.n_heads:
            out.append(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                       "set model.head_dim explicitly")
        if self.position == "rope" and self.kv_head_dim % 2:
            out.append(f"RoPE needs an even head dimension, got {self.kv_head_dim}")
        if self.attn_softcap and self.attention_impl == "cudnn":
            out.append(f"model.attention_impl={self.attention_impl} has no score soft-capping "
                       f"(model.attn_softcap={self.attn_softcap}): use xla, blockwise or auto")
        if self.attention_window < 0 or self.global_every and self.attention_impl in ("flash", "cudnn"):
            out.append(f"model.attention_window={self.attention_window} must be >= 0 (0: no window), and "
                       f"model.attention_impl={self.attention_impl} has a fixed window, none that alternates with "
                       f"global layers (model.global_every={self.global_every}): use auto, xla or blockwise")
        if self.global_every < 0 or self.global_every and (not self.attention_window or mixed_layers(self)):
            out.append(f"model.global_every={self.global_every} needs model.attention_window (and no dense blocks "
                       "beside a mixture of experts: model.moe_first_dense=0, model.moe_every=1)")
        if self.rope_scaling != "none" and not self.rope_factor >= 1:
            out.append(f"model.rope_factor must be >= 1 with model.rope_scaling={self.rope_scaling}, "
                       f"got {self.rope_factor}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            out.append("model.rope_high_freq_factor must be above model.rope_low_freq_factor, and both positive")
        out.extend(self._moe_problems())
        return out

    def _moe_problems(self) -> list[str]:
        if self.moe_experts < 0:
            return [f"model.moe_experts must be >= 0 (0: a dense model), got {self.moe_experts}"]
        if not self.moe_experts:
            return []
        out = []
        if not 0 <= self.moe_first_dense < self.n_layers or self.moe_every < 1:
            out.append(f"model.moe_first_dense={self.moe_first_dense} must be in [0, model.n_layers) and "
                       f"model.moe_every={self.moe_every} >= 1")
        elif (self.n_layers - self.moe_first_dense) % self.moe_every:
            out.append(f"the {self.n_layers - self.moe_first_dense} layers after model.moe_first_dense="
                       f"{self.moe_first_dense} do not split into groups of model.moe_every={self.moe_every}, each "
                       "ending in a mixture: choose model.n_layers, moe_first_dense and moe_every to fit")
        if not 1 <= self.moe_top_k <= self.moe_experts:
            out.append(f"model.moe_top_k={self.moe_top_k} must be between 1 and model.moe_experts={self.moe_experts}")
        if self.moe_d_ff < 0 or self.moe_shared_d_ff < 0:
            out.append("model.moe_d_ff and model.moe_shared_d_ff must be >= 0 (0: d_ff; no shared expert)")
        if self.moe_dispatch == "capacity" and not self.moe_capacity_factor > 0:
            out.append(f"model.moe_capacity_factor must be positive with model.moe_dispatch=capacity, "
                       f"got {self.moe_capacity_factor}")
        if self.moe_imbalance < 1:
            out.append(f"model.moe_imbalance={self.moe_imbalance}: the busiest shard's load over the mean is >= 1")
        if self.moe_shared_gate and not self.moe_shared_d_ff:
            out.append("model.moe_shared_gate needs a shared expert: set model.moe_shared_d_ff")
        if self.use_bias:
            out.append("model.use_bias: the experts have no biases; set model.use_bias=false with model.moe_experts")
        return out


def moe_layer_count(cfg: ModelConfig) -> int:
    """How many blocks are mixtures of experts (``moe_first_dense``, ``moe_every``)."""
    return (cfg.n_layers - cfg.moe_first_dense) // cfg.moe_every if cfg.moe_experts else 0


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether block ``layer`` (from 0) is a mixture: the last of each group of ``moe_every`` after the
    dense first ones."""
    return bool(cfg.moe_experts) and layer >= cfg.moe_first_dense and (
        layer - cfg.moe_first_dense + 1) % cfg.moe_every == 0


def mixed_layers(cfg: ModelConfig) -> bool:
    """Whether a mixture of experts has dense blocks too."""
    return bool(cfg.moe_experts) and (cfg.moe_first_dense > 0 or cfg.moe_every > 1)


def layer_mix(cfg: ModelConfig) -> list[tuple[ModelConfig, int]]:
    """The blocks' configs and how many blocks have each: a dense model's one; a mixture's, and where it
    has dense blocks too, theirs (``moe_experts=0``: an MLP of width d_ff)."""
    moe = moe_layer_count(cfg)
    kinds = [(cfg.replace(moe_experts=0), cfg.n_layers - moe), (cfg, moe)] if cfg.moe_experts else [(cfg, cfg.n_layers)]
    return [(kind, n) for kind, n in kinds if n]


def stack_units(cfg: ModelConfig) -> int:
    """Entries of the scanned stack of blocks, which pipeline stages split: a block each, or with
    ``moe_every`` > 1 a group of that many (dense ones, then a mixture); the dense first blocks
    (``moe_first_dense``) run before the stack."""
    return moe_layer_count(cfg) if mixed_layers(cfg) else cfg.n_layers


def layer_window(cfg: ModelConfig, layer: int) -> int:
    """The attention window of layer ``layer`` (from 0): ``attention_window``, 0 on the global layers."""
    return 0 if cfg.global_every and (layer + 1) % cfg.global_every == 0 else cfg.attention_window


def active_d_ff(cfg: ModelConfig) -> int:
    """The MLP width a token runs through: d_ff, or its top-k experts' and the shared expert's."""
    return cfg.moe_top_k * cfg.expert_d_ff + cfg.moe_shared_d_ff if cfg.moe_experts else cfg.d_ff


def expert_param_count(cfg: ModelConfig) -> int:
    """Parameters of one routed expert (its MLP's matrices)."""
    return (3 if cfg.activation in GATED else 2) * cfg.d_model * cfg.expert_d_ff


def routed_param_count(cfg: ModelConfig) -> int:
    """Parameters of one block's routed experts (0: a dense model): split over the expert axis."""
    return cfg.moe_experts * expert_param_count(cfg)


def expert_indivisible(cfg: ModelConfig, expert: int) -> bool:
    """Whether ``expert`` devices cannot each hold an equal share of the experts (a dense model has none)."""
    return expert > 1 and (not cfg.moe_experts or cfg.moe_experts % expert != 0)


def named_widths(cfg: ModelConfig) -> dict[str, tuple[int, bool]]:
    """Features per token of each tensor ``REMAT_NAMES`` tags, and whether tensor parallelism splits it."""
    heads, kv = cfg.n_heads * cfg.kv_head_dim, cfg.n_kv_heads * cfg.kv_head_dim
    mlp_inputs = 2 if cfg.activation in GATED else 1
    return {"query_proj": (heads, True), "key_proj": (kv, True), "value_proj": (kv, True),
            "attention_out": (heads, True), "out_proj": (cfg.d_model, False),
            "mlpwi": (mlp_inputs * active_d_ff(cfg), True), "mlpwo": (cfg.d_model, False)}


def tensor_indivisible(cfg: ModelConfig, tensor: int) -> str | None:
    """The first size of ``TENSOR_SPLIT`` that ``tensor`` devices do not divide (None: they all split)."""
    return next((name for name in TENSOR_SPLIT if getattr(cfg, name) % tensor), None)


def block_param_count(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.kv_head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = mlp_param_count(cfg, active=False)
    norms = 2 * d * (2 if cfg.norm == "layernorm" else 1)
    biases = hd * (cfg.n_heads + 2 * cfg.n_kv_heads) if cfg.use_bias or cfg.qkv_bias else 0
    if cfg.use_bias:
        biases += d + (cfg.d_ff if cfg.activation == "gelu" else 0) + d
    head_norms = 2 * hd if cfg.qk_norm else 0
    post_norms = norms if cfg.post_norms else 0
    return attn + mlp + norms + biases + head_norms + post_norms


def mlp_param_count(cfg: ModelConfig, active: bool) -> int:
    """Parameters of one block's MLP: a dense one, or the router, the experts (all of them, or only
    the ``moe_top_k`` a token runs through when ``active``) and the shared expert."""
    per_width = (3 if cfg.activation in GATED else 2) * cfg.d_model
    if not cfg.moe_experts:
        return per_width * cfg.d_ff
    routed = (cfg.moe_top_k if active else cfg.moe_experts) * expert_param_count(cfg)
    return cfg.d_model * cfg.moe_experts + routed + per_width * cfg.moe_shared_d_ff + cfg.d_model * cfg.moe_shared_gate


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of the model the config builds."""
    d = cfg.d_model
    embed = cfg.vocab_size * d
    positions = cfg.max_seq_len * d if cfg.position == "learned" else 0
    final_norm = d * (2 if cfg.norm == "layernorm" else 1)
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    blocks = sum(n * block_param_count(kind) for kind, n in layer_mix(cfg))
    return embed + positions + blocks + final_norm + head


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix product per token (embedding lookups do not, the head
    does; of a mixture of experts, those of the experts the token is routed to: its active parameters)."""
    d, hd = cfg.d_model, cfg.kv_head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = sum(n * mlp_param_count(kind, active=True) for kind, n in layer_mix(cfg))
    return cfg.n_layers * attn + mlp + d * cfg.vocab_size


def tile(length: int) -> int | None:
    """The block size of the tiled attention kernels for sequences of ``length`` (None: no tile divides it)."""
    return next((b for b in TILES if length % b == 0), None)


def attention_implementation(cfg: ModelConfig, platform: str, seq_len: int = 0) -> str:
    """The attention kernel ``cfg.attention_impl`` means on ``platform`` for sequences of ``seq_len``:
    ``auto`` is cuDNN's fused flash attention on GPUs in 16-bit (cuDNN has no float32 kernel), the
    Pallas splash-attention kernel on TPUs, and elsewhere XLA's attention, or from ``BLOCKWISE_FROM``
    tokens the blockwise one (no seq x seq scores); the two tiled kernels for lengths they tile. Scores
    soft-capped (``attn_softcap``: not cuDNN's) or a window that alternates with global layers
    (``global_every``: cuDNN's window and the Pallas kernel's mask are fixed): XLA's or the blockwise one."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    if platform == "gpu" and cfg.dtype != "float32" and not cfg.attn_softcap and not cfg.global_every:
        return "cudnn"
    tiled = seq_len > 0 and tile(seq_len) is not None
    if platform == "tpu" and tiled and not cfg.global_every:
        return "flash"
    return "blockwise" if tiled and seq_len >= BLOCKWISE_FROM else "xla"


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation).

    6 per matmul parameter, plus 12 * layers * heads * head_dim * seq_len for the attention
    scores and the weighted sum (counted over the full, not the causal, square, as PaLM does).
    """
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.kv_head_dim * seq_len
    return 6.0 * matmul_param_count(cfg) + attention
