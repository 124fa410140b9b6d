"""Large training runs published with their hardware, model, layout and throughput: what the planner's
cost model is measured against (``benchmarks/planner.py``; a unit test keeps it within bounds).

Each row: the model (fax fields), the cluster preset, global batch, sequence length, the published
layout as fax's ``Candidate``, and the published throughput as TFLOP/s per device by the source's own
FLOP count (converted to tokens/s with that count). Assumptions where a source is silent, one per row
kind:

- Megatron-LM (Narayanan et al., SC 2021, Table 1; A100 80GB, 8 per DGX node, 8 x HDR InfiniBand).
  GPT models: vocabulary 51,200, sequence 2048, LayerNorm, GELU, learned positions, biases, tied
  embeddings, full activation recomputation. Their FLOP count (hardware FLOPs, the recomputed forward
  included) is 96 B s l h^2 (1 + s / 6h + V / 16 l h). Microbatch size 1 in the pipelines; without a
  pipeline, the fewest microbatches whose activations fit. 2021's Megatron had no fused attention: its
  scores were materialised, costed as fax's XLA attention. Its 1F1B schedule holds S microbatches'
  stage inputs in flight; fax's pipeline keeps every tick's (GPipe order), which fits at this scale
  with the residual stream split over the tensor axis (sequence parallelism) and each tick's stage
  recomputed (``stage_remat``, the full recomputation Megatron did).
- MaxText (``MaxText/configs/v5p/README.md`` and ``v5e/README.md``, one slice each; the model shapes
  of ``global_parameter_scale``: base 2048 wide, 16 heads of 128, MLP 7168 SwiGLU, 16 layers,
  vocabulary 32,000; the layouts and per-device batches of ``configs/v5p/<size>b.sh`` and
  ``configs/v5e/<size>b.sh``, as they stand; sequence 2048; splash (flash) attention). The 32B row on
  v5p-128 runs 6 sequences per chip, its config's batch as it stands (earlier revisions had 7; the
  README's figure is the same through both). Their FLOP count is 6 per
  matmul parameter plus 12 l s H per token (attention's full square), fax's ``train_flops_per_token``.
  MaxText's ``remat_policy=minimal`` keeps every weight matmul's output: fax's
  ``dots_with_no_batch_dims_saveable``. MaxText shards the activations' embedding dimension over the
  tensor axis: fax's sequence parallelism (``tensor_sequence``) keeps the same share. The v5e 128B row (host-offloaded remat of every matmul output)
  has no fax policy and is left out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from fax.models.config import ModelConfig, train_flops_per_token
from fax.parallel.layout import Candidate


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: ModelConfig
    cluster: str
    global_batch: int
    seq_len: int
    layout: Candidate
    tflops_per_device: float  # as published, by the source's FLOP count
    source_flops_per_token: float  # that count, per token

    @property
    def devices(self) -> int:
        from fax.parallel.hardware import cluster_preset

        return cluster_preset(self.cluster).devices

    @property
    def tokens_per_s(self) -> float:
        return self.tflops_per_device * 1e12 * self.devices / self.source_flops_per_token


def megatron_flops_per_token(m: ModelConfig, seq: int) -> float:
    """Megatron-LM's hardware FLOPs per token with full recomputation: 96 l h^2 (1 + s / 6h + V / 16 l h)."""
    h, layers = m.d_model, m.n_layers
    return 96 * layers * h ** 2 * (1 + seq / (6 * h) + m.vocab_size / (16 * layers * h))


def megatron_gpt(hidden: int, heads: int, layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=51200, max_seq_len=2048, d_model=hidden, n_layers=layers, n_heads=heads,
                       n_kv_heads=heads, d_ff=4 * hidden, dtype="bfloat16", attention_impl="xla")


# (billions, heads, hidden, layers, tensor, pipeline, GPUs, batch, TFLOP/s per GPU)
MEGATRON_TABLE_1 = (
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)


def megatron_runs() -> list[PublishedRun]:
    runs = []
    for billions, heads, hidden, layers, tensor, stages, gpus, batch, tflops in MEGATRON_TABLE_1:
        model = megatron_gpt(hidden, heads, layers)
        data = gpus // (tensor * stages)
        if stages > 1:
            layout = Candidate(stages=stages, microbatches=batch // data, data=data, tensor=tensor, remat="none",
                               stage_remat=True, tensor_sequence=True)
        else:
            layout = Candidate(data=data, tensor=tensor, remat="full", microbatches=fewest_fitting(
                model, f"a100-{gpus}", batch, data, tensor))
        runs.append(PublishedRun(f"Megatron-LM {billions}B", model, f"a100-{gpus}", batch, 2048, layout, tflops,
                                 megatron_flops_per_token(model, 2048)))
    return runs


def fewest_fitting(model: ModelConfig, cluster_name: str, batch: int, data: int, tensor: int) -> int:
    """The fewest microbatches (a power of two) with which a data x tensor layout fits, full remat."""
    from fax.parallel.cost import estimate
    from fax.parallel.layout import Workload
    from fax.parallel.hardware import cluster_preset

    cluster = cluster_preset(cluster_name)
    w = Workload(model, batch, 2048, cluster.device.platform)
    for mb in (2 ** i for i in range(int(math.log2(batch // data)) + 1)):
        if estimate(Candidate(data=data, tensor=tensor, remat="full", microbatches=mb), w, cluster).fits:
            return mb
    return batch // data


def maxtext_model(scale: int) -> ModelConfig:
    """MaxText's ``global_parameter_scale``: the heads and MLP, the width, the layers doubled in turn."""
    base, rem = divmod(int(math.log2(scale)), 3)
    heads = 2 ** (base + (rem > 0))
    width = 2 ** (base + (rem > 1))
    return ModelConfig(vocab_size=32000, max_seq_len=2048, d_model=2048 * width, n_layers=16 * 2 ** base,
                       n_heads=16 * heads, n_kv_heads=16 * heads, head_dim=128, d_ff=7168 * heads, norm="rmsnorm",
                       activation="swiglu", position="rope", use_bias=False, tie_embeddings=False,
                       dtype="bfloat16", attention_impl="flash")


# (scale, cluster, tensor, per-device batch, remat, TFLOP/s per chip), the configs as they stand (see above)
MAXTEXT_RUNS = (
    (32, "v5p-128", 4, 6, "dots_with_no_batch_dims_saveable", 328),
    (64, "v5p-128", 4, 3, "dots_with_no_batch_dims_saveable", 323),
    (128, "v5p-256", 8, 1, "dots_with_no_batch_dims_saveable", 315),
    (128, "v5p-512", 8, 1, "dots_with_no_batch_dims_saveable", 316),
    (256, "v5p-1024", 8, 1, "dots_with_no_batch_dims_saveable", 308),
    (512, "v5p-1024", 8, 2, "full", 294),
    (16, "v5e-256", 1, 6, "full", 120),
    (32, "v5e-256", 1, 4, "full", 132),
    (64, "v5e-256", 1, 2, "full", 118),
)


def maxtext_runs() -> list[PublishedRun]:
    from fax.parallel.hardware import cluster_preset

    runs = []
    for scale, cluster, tensor, per_device, remat, tflops in MAXTEXT_RUNS:
        model = maxtext_model(scale)
        chips = cluster_preset(cluster).devices
        layout = Candidate(fsdp=chips // tensor, tensor=tensor, remat=remat, tensor_sequence=tensor > 1)
        runs.append(PublishedRun(f"MaxText {scale}B", model, cluster, per_device * chips, 2048, layout, tflops,
                                 train_flops_per_token(model, 2048)))
    return runs


# Published layouts the cost model does not let through (more than ``MEMORY_HEADROOM`` of the chip's
# memory), beside XLA's verdict: `fax compile` of the row's settings for its slice, the peak per device
# that XLA:TPU holds against HBM.
NOT_PREDICTED_TO_FIT = {
    ("MaxText 64B", "v5p-128"): "predicted 90.0 GiB: fits the chip, past the planner's 10% margin, which "
                                "`fax plan --validate` leaves to the compiler; XLA 90.8 GiB: fits",
}


def published_runs() -> list[PublishedRun]:
    return megatron_runs() + maxtext_runs()


def compare(run: PublishedRun) -> dict:
    """The cost model's figures for a published layout next to the published throughput."""
    from fax.parallel.cost import estimate
    from fax.parallel.layout import Workload
    from fax.parallel.hardware import cluster_preset
    from fax.parallel.hlo import fits_device

    cluster = cluster_preset(run.cluster)
    e = estimate(run.layout, Workload(run.model, run.global_batch, run.seq_len, cluster.device.platform), cluster)
    return {"run": run.name, "cluster": run.cluster, "layout": run.layout.describe(),
            "published_tokens_s": run.tokens_per_s, "predicted_tokens_s": e.tokens_per_s,
            "ratio": e.tokens_per_s / run.tokens_per_s, "fits": e.fits, "memory_gib": e.memory_bytes / 2 ** 30,
            "fits_device": fits_device(e.memory_bytes, cluster.device.hbm_bytes, cluster.device.platform),
            "estimate": e}


def fax_settings(run: PublishedRun) -> list[str]:
    """The row's model and batch as ``fax train`` / ``fax compile`` settings."""
    fields = (f"model.{f.name}={getattr(run.model, f.name)}" for f in dataclasses.fields(run.model))
    return [*fields, f"train.batch_size={run.global_batch}", f"train.seq_len={run.seq_len}"]


def compiled(run: PublishedRun) -> dict:
    """XLA's verdict on fax's step for a TPU row's published layout (libtpu: one process at a time),
    beside the cost model's memory."""
    from fax.config import load_config, with_layout
    from fax.train.aot import compile_step, target_devices

    step = compile_step(with_layout(load_config(None, fax_settings(run)), run.layout), *target_devices(run.cluster))
    needed = step.needed_bytes / 2 ** 30
    if step.out_of_memory:  # XLA's refusal names what the step would need
        refused = re.search(r"temporaries \(([\d.]+)G\)", step.out_of_memory)
        needed = float(refused.group(1)) if refused else None
    return {"run": run.name, "cluster": run.cluster, "predicted_gib": compare(run)["memory_gib"], "xla_gib": needed,
            "fits": step.fits, "compile_s": step.compile_s}


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["--aot"]:  # the TPU rows compiled, one JSON line each
        for run in published_runs():
            if run.cluster.startswith("v"):
                print(json.dumps(compiled(run)), flush=True)
        sys.exit()
    for run in published_runs():
        r = compare(run)
        e = r.pop("estimate")
        terms = " ".join(f"{k} {v:.2f}" for k, v in e.compute_terms.items())
        comm = " ".join(f"{k} {v:.2f}" for k, v in e.comm_s.items() if v)
        print(f"{r['run']:<22}{r['cluster']:<10} ratio {r['ratio']:.2f} fits {r['fits']} {r['memory_gib']:.0f} GiB "
              f"step {e.step_s:.2f}: {terms} bubble {e.bubble_s:.2f} exposed {e.exposed_comm_s:.2f} [{comm}]")
    _ = dataclasses
