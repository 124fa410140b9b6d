"""Planner speed on large presets, and quality on the present devices.

    python benchmarks/planner.py [--measure 12]

Speed: seconds to plan GPT-3 175B on h100-1024 and Llama 70B on v4-1024 (goal < 10 s each).
Scaling: planning time against device count (8 ... 4096) and layer count.
Published runs: for large runs published with their hardware, layout and throughput, the cost model's
throughput for that same layout next to the published figure, and the planner's own pick next to both.
Quality: on the 8 emulated devices, the step time of ``--measure`` layouts (remat none, the pick and
others spread over the ranking; two model sizes) is measured; printed: the pick's measured time /
the best measured, and Spearman's rank correlation between predicted and measured step times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# name, model (overrides of gpt3-175b), cluster, global batch, seq, layout, published TFLOP/s per GPU
# (hardware FLOPs by Megatron-LM's formula, which counts the recomputed forward pass).
PUBLISHED_RUNS = (
    # Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
    # (SC 2021), table 1: GPT-3 175B and the 1T model on A100 80GB, activation recomputation, microbatch 1.
    ("Megatron-LM GPT-3 175B", {}, "a100-1024", 1536, 2048,
     dict(stages=16, tensor=8, data=8, microbatches=192, remat="full"), 140e12),
    ("Megatron-LM 1T", dict(d_model=25600, n_layers=128, n_heads=160, n_kv_heads=160, d_ff=102400),
     "a100-3072", 3072, 2048, dict(stages=64, tensor=8, data=6, microbatches=512, remat="full"), 163e12),
)


def megatron_flops_per_token(m, seq: int) -> float:
    """Megatron-LM's hardware FLOPs per token with full recomputation: 96 l h^2 (1 + s / 6h + V / 16 l h)."""
    h, layers = m.d_model, m.n_layers
    return 96 * layers * h ** 2 * (1 + seq / (6 * h) + m.vocab_size / (16 * layers * h))


def published_runs() -> list[dict]:
    """Published tokens/s (from TFLOP/s per GPU) vs the cost model's for the same layout, and the pick's."""
    from fax import models
    from fax.parallel.cost import Candidate, Workload, estimate
    from fax.parallel.hardware import cluster_preset
    from fax.parallel.planner import plan

    rows = []
    for name, overrides, cluster_name, batch, seq, layout, tflops in PUBLISHED_RUNS:
        model = dataclasses.replace(models.preset("gpt3-175b"), dtype="bfloat16", max_seq_len=seq, **overrides)
        cluster = cluster_preset(cluster_name)
        published = tflops * cluster.devices / megatron_flops_per_token(model, seq)
        same = estimate(Candidate(**layout), Workload(model, batch, seq, cluster.device.platform), cluster)
        pick = plan(model, cluster, batch, seq, name).best
        rows.append({"run": name, "cluster": cluster_name, "layout": same.candidate.describe(),
                     "published_tokens_s": published, "predicted_tokens_s": same.tokens_per_s,
                     "fits": same.fits, "pick": pick.candidate.describe(), "pick_tokens_s": pick.tokens_per_s})
    return rows


def planning_scaling() -> list[dict]:
    """Seconds to plan Llama 7B as the device count and the layer count grow."""
    from fax import models
    from fax.parallel.hardware import cluster_preset
    from fax.parallel.planner import plan

    rows = []
    base = dataclasses.replace(models.preset("llama-7b"), dtype="bfloat16")
    shapes = [(f"h100-{n}", base) for n in (8, 64, 512, 4096)]
    shapes += [("h100-512", dataclasses.replace(base, n_layers=layers)) for layers in (8, 128, 512)]
    for cluster, model in shapes:
        started = time.perf_counter()
        result = plan(model, cluster_preset(cluster), 1024, 2048)
        rows.append({"cluster": cluster, "layers": model.n_layers, "seconds": time.perf_counter() - started,
                     "layouts": result.searched})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", type=int, default=12, help="layouts measured per model, spread over the ranking")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from fax import models
    from fax import load_config
    from fax.train.planning import layout_timer
    from fax.parallel.calibrate import calibrate
    from fax.parallel.calibrate import present_cluster
    from fax.parallel.hardware import cluster_preset
    from fax.parallel.planner import plan

    results: dict = {"speed_s": {}, "quality": {}}
    for name, cluster, batch, seq in (("gpt3-175b", "h100-1024", 1536, 2048), ("llama-70b", "v4-1024", 1024, 4096)):
        started = time.perf_counter()
        best = plan(models.preset(name), cluster_preset(cluster), batch, seq, name)
        seconds = time.perf_counter() - started
        results["speed_s"][f"{name}@{cluster}"] = seconds
        print(f"plan {name} on {cluster}: {seconds:.2f} s, {best.searched} layouts; pick "
              f"{best.best.candidate.describe()}, predicted MFU {best.best.mfu:.2f}")
    print("planning time, Llama 7B, batch 1024 x 2048:")
    results["scaling"] = planning_scaling()
    for r in results["scaling"]:
        print(f"    {r['cluster']:<10} {r['layers']:>4} layers: {r['seconds']:6.2f} s, {r['layouts']} layouts")
    print("published runs: tokens/s published, predicted for the same layout, the planner's pick (predicted):")
    results["published"] = published_runs()
    for r in results["published"]:
        print(f"    {r['run']} on {r['cluster']} ({r['layout']}): published {r['published_tokens_s']:,.0f}, "
              f"predicted {r['predicted_tokens_s']:,.0f} ({r['predicted_tokens_s'] / r['published_tokens_s']:.2f}x"
              f"{'' if r['fits'] else ', predicted not to fit'}); pick {r['pick']}: {r['pick_tokens_s']:,.0f} "
              f"({r['pick_tokens_s'] / r['published_tokens_s']:.2f}x)")
    profile = calibrate(jax.devices())  # as `fax plan --calibrate` does: the plans below use it
    here = present_cluster()
    print(f"calibrated {here.name}: knees (rows, cols) {here.device.matmul_knees[0]:.0f}, "
          f"{here.device.matmul_knees[1]:.0f}, peak {here.device.peak_flops / 1e9:.1f} "
          f"GFLOP/s per device, link {profile['link_bandwidth'] / 1e9:.2f} GB/s")
    for name, batch, seq in (("gpt-tiny", 16, 128), ("gpt-mini", 16, 128)):
        result = plan(models.preset(name), here, batch, seq, name, top=10_000)
        ranked = [e for e in result.ranked if e.candidate.remat == "none"]
        picks = sorted({round(i) for i in np.linspace(0, len(ranked) - 1, args.measure)})
        pool = [ranked[i] for i in picks]  # the pick and layouts spread over the whole ranking
        timer = layout_timer(load_config(overrides=[f"model={name}", f"train.batch_size={batch}",
                                                    f"train.seq_len={seq}"]), jax.devices())
        measured = [timer(e.candidate) for e in pool]
        predicted = [e.step_s for e in pool]
        ratio = measured[0] / min(measured)
        rho = spearman(predicted, measured)
        results["quality"][name] = {"pick_over_best": ratio, "spearman": rho, "ranks": picks,
                                    "rows": [(e.candidate.describe(), e.step_s, m) for e, m in zip(pool, measured)]}
        print(f"{name}: {len(pool)} of {len(ranked)} layouts (remat none) measured; pick / measured best = "
              f"{ratio:.2f}, rank correlation predicted vs measured = {rho:.2f}")
        for rank, e, m in sorted(zip(picks, pool, measured), key=lambda x: x[2]):
            print(f"    #{rank + 1:<4}{e.candidate.describe():<48} predicted {e.step_s * 1e3:8.1f} ms  "
                  f"measured {m * 1e3:8.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
