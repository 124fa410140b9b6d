"""The table tying every fax parameter to the Hugging Face tensor it comes from (per layer, per
expert), with the transpose and reshape between the layouts: import and export both read it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from fax.models import LayerGroup, ModelConfig, layer_groups
from fax.interop.hf_config import family, model_type


@dataclass(frozen=True)
class Tie:
    """fax parameter ``fax`` (per layer when ``hf`` has ``{i}``, per expert of a layer's ``{j}``) <-> HF
    tensor ``hf``."""

    fax: tuple[str, ...]
    hf: str
    hf_shape: tuple[int, ...]  # of the HF tensor (or of its column range), as stored
    transpose: bool = False  # torch Linear stores [out, in]
    cols: tuple[int, int] | None = None  # the columns of a fused tensor (last axis)
    fused_width: int = 0  # the fused tensor's last axis
    layers: LayerGroup | None = None  # where the blocks of a per-layer tensor are stored (``ties`` places it)
    leading: tuple[int, ...] = ()  # the fax parameter's leading axes, one HF tensor per entry: layers, experts

    def entries(self) -> Iterator[tuple[tuple[int, ...], str]]:
        """Each entry of the leading axes and the HF tensor it is."""
        for index in np.ndindex(*self.leading):
            yield index, self.name(index)

    def name(self, index: tuple[int, ...]) -> str:
        """The HF tensor of entry ``index`` along the leading axes."""
        layers = len(self.layers.dims) if self.layers else 0
        at = {"i": self.layers.layer(index[:layers])} if self.layers else {}
        return self.hf.format(**at, **({"j": index[layers]} if len(index) > layers else {}))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the HF tensor as stored (a fused tensor's whole)."""
        return (*self.hf_shape[:-1], self.fused_width) if self.cols else self.hf_shape

    def piece(self, read: Callable[[tuple[slice, ...] | None], np.ndarray], unit: tuple[int, ...],
              index: tuple[slice, ...]) -> np.ndarray:
        """The part ``index`` of one entry (of shape ``unit``), reading through ``read`` (stored slices ->
        array; None: the whole tensor) only the region of the stored tensor it comes from, where the
        layouts keep it one block (a device's slice of the heads or the width: every fax layout here)."""
        index = tuple(s if isinstance(s, slice) else slice(s, s + 1) for s in index)
        index += (slice(None),) * (len(unit) - len(index))
        view = self.hf_shape[::-1] if self.transpose else self.hf_shape  # the stored tensor as fax reads it
        ranges = view_ranges(view, unit, index)
        if ranges is None:
            return self.to_fax(read(None), unit)[index]
        stored = list(ranges[::-1] if self.transpose else ranges)
        if self.cols:  # the columns of a fused tensor: its last axis, offset
            last = stored[-1]
            stored[-1] = slice(self.cols[0] + last.start, self.cols[0] + last.stop)
        block = read(tuple(stored))
        return (block.T if self.transpose else block).reshape(
            [len(range(*s.indices(n))) for s, n in zip(index, unit)])

    def to_fax(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        part = tensor[..., self.cols[0]:self.cols[1]] if self.cols else tensor
        return (part.T if self.transpose else part).reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        return value.reshape(self.hf_shape[::-1]).T if self.transpose else value.reshape(self.hf_shape)


def view_ranges(view: tuple[int, ...], unit: tuple[int, ...], index: tuple[slice, ...]) -> list[slice] | None:
    """The range of each axis of ``view`` that ``index`` (slices of ``unit``, a reshape of ``view`` that
    splits each of its axes into consecutive ones) covers; None where that is not one block (a split
    axis sliced past its first part)."""
    ranges, at = [], 0
    for size in view:
        group, width = [], 1
        while width < size and at < len(unit):
            group.append(at)
            width *= unit[at]
            at += 1
        if width != size or not group:
            return None
        starts = [index[u].indices(unit[u]) for u in group]
        if any(start != 0 or stop != unit[u] or step != 1 for u, (start, stop, step) in zip(group[1:], starts[1:])):
            return None
        inner = width // unit[group[0]]
        ranges.append(slice(starts[0][0] * inner, starts[0][1] * inner))
    return ranges if at == len(unit) else None


def ties(cfg: ModelConfig) -> list[Tie]:
    """Every tie of the model, those of the blocks placed on the stacks that hold them (``placed``)."""
    out = family_ties(cfg)
    dense_mlp = [t for t in out if t.fax[:2] == ("blocks", "mlp")]
    shared = [t for t in out if t not in dense_mlp]
    return placed(cfg, shared, None) + placed(cfg, dense_mlp, False) + placed(cfg, moe_ties(cfg), True)


def family_ties(cfg: ModelConfig) -> list[Tie]:
    """The ties of GPT-2's or Llama's layout, a block's written for ``("blocks", ...)`` and HF layer ``{i}``."""
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
           *([Tie(("blocks", "post_attn_norm", "scale"), f"{layer}post_attention_layernorm.weight", (d,)),
              Tie(("blocks", "mlp_norm", "scale"), f"{layer}pre_feedforward_layernorm.weight", (d,)),
              Tie(("blocks", "post_mlp_norm", "scale"), f"{layer}post_feedforward_layernorm.weight", (d,))]
             if cfg.post_norms else [Tie(("blocks", "mlp_norm", "scale"), f"{layer}post_attention_layernorm.weight", (d,))]),
           Tie(("blocks", "attn", "wq"), f"{layer}self_attn.q_proj.weight", (h * hd, d), transpose=True),
           Tie(("blocks", "attn", "wk"), f"{layer}self_attn.k_proj.weight", (kv * hd, d), transpose=True),
           Tie(("blocks", "attn", "wv"), f"{layer}self_attn.v_proj.weight", (kv * hd, d), transpose=True),
           Tie(("blocks", "attn", "wo"), f"{layer}self_attn.o_proj.weight", (d, h * hd), transpose=True),
           Tie(("blocks", "mlp", "wg"), f"{layer}mlp.gate_proj.weight", (f, d), transpose=True),
           Tie(("blocks", "mlp", "wi"), f"{layer}mlp.up_proj.weight", (f, d), transpose=True),
           Tie(("blocks", "mlp", "wo"), f"{layer}mlp.down_proj.weight", (d, f), transpose=True)]
    if cfg.qkv_bias:
        out += [Tie(("blocks", "attn", f"{x}_bias"), f"{layer}self_attn.{x}_proj.bias", (n * hd,))
                for x, n in (("q", h), ("k", kv), ("v", kv))]
    if cfg.qk_norm:
        out += [Tie(("blocks", "attn", f"{x}_norm", "scale"), f"{layer}self_attn.{x}_norm.weight", (hd,)) for x in "qk"]
    if not cfg.tie_embeddings:
        out.append(Tie(("head",), "lm_head.weight", (v, d), transpose=True))
    return out


def placed(cfg: ModelConfig, block_ties: list[Tie], moe: bool | None) -> list[Tie]:
    """Ties written for one block (fax ``("blocks", ...)``, HF ``{i}``) placed on every stack of blocks
    (``layer_groups``) that has them: the dense MLP's on dense blocks, the experts' on mixtures (``moe``),
    the rest (None) on all."""
    out = []
    for tie in block_ties:
        if "{i}" not in tie.hf:
            out.append(tie)
            continue
        experts = (cfg.moe_experts,) if "{j}" in tie.hf else ()
        out += [dataclasses.replace(tie, fax=group.path + tie.fax[1:], layers=group, leading=group.dims + experts)
                for group in layer_groups(cfg) if moe is None or group.moe == moe]
    return out


def moe_ties(cfg: ModelConfig) -> list[Tie]:
    """A mixture of experts' router, experts and shared expert: Mixtral's names, or Qwen's MoE's."""
    if not cfg.moe_experts:
        return []
    d, e, f, shared = cfg.d_model, cfg.moe_experts, cfg.expert_d_ff, cfg.moe_shared_d_ff
    layer = "model.layers.{i}."
    if model_type(cfg) == "mixtral":
        moe = f"{layer}block_sparse_moe."
        names = {"wg": "w1", "wi": "w3", "wo": "w2"}
    else:
        moe = f"{layer}mlp."
        names = {"wg": "gate_proj", "wi": "up_proj", "wo": "down_proj"}
    out = [Tie(("blocks", "mlp", "router"), f"{moe}gate.weight", (e, d), transpose=True)]
    for w, name in names.items():
        shape = (d, f) if w == "wo" else (f, d)
        out.append(Tie(("blocks", "mlp", w), f"{moe}experts.{{j}}.{name}.weight", shape, transpose=True))
        if shared:
            out.append(Tie(("blocks", "mlp", "shared", w), f"{moe}shared_expert.{name}.weight",
                           (d, shared) if w == "wo" else (shared, d), transpose=True))
    if cfg.moe_shared_gate:
        out.append(Tie(("blocks", "mlp", "shared_gate"), f"{moe}shared_expert_gate.weight", (1, d), transpose=True))
    return out
