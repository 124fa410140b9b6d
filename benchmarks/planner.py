"""Planner speed on large presets, and quality on the present devices.

    python benchmarks/planner.py [--measure 12]

Speed: seconds to plan GPT-3 175B on h100-1024 and Llama 70B on v4-1024 (goal < 10 s each).
Pipeline: the measured bubble of the GPipe schedule against its formula.
Quality: on the 8 emulated devices, the step time of ``--measure`` layouts (remat none, the pick and
others spread over the ranking; two model sizes) is measured; printed: the pick's measured time /
the best measured, and Spearman's rank correlation between predicted and measured step times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure_bubble(stages: int = 4, micro_rows: int = 8, width: int = 256, layers: int = 8) -> list[dict]:
    """Forward + backward of a stack of layers alone: pipelined over ``stages`` stages with M microbatches,
    against the same work spread evenly (the stage axis used for data instead, no pipeline). The
    measured bubble is 1 - even / pipelined; the schedule's is (S - 1) / (M + S - 1)."""
    import jax.numpy as jnp
    import numpy as np

    from fax.step import with_activation_sharding
    from models import scan_layers
    from parallel import ParallelConfig, logical_sharding, make_mesh
    from parallel.pipeline import bubble_fraction, gpipe

    rng = np.random.default_rng(0)
    weights = {k: rng.normal(0, width ** -0.5, (layers, width, width)).astype(np.float32) for k in ("w1", "w2")}

    def layer(h, p):
        return h + jnp.tanh(h @ p["w1"]) @ p["w2"]

    def seconds(run, parallel: ParallelConfig, micro: int) -> float:
        mesh = make_mesh(parallel)
        params = {k: jax.device_put(w, logical_sharding(("layers", "embed", None), mesh)) for k, w in weights.items()}
        x = jax.device_put(rng.normal(size=(micro * micro_rows, 64, width)).astype(np.float32),
                           logical_sharding(("batch", "length", "embed"), mesh))
        grad = jax.jit(with_activation_sharding(jax.grad(lambda p, x: jnp.sum(run(layer, p, x) ** 2)), mesh))
        jax.block_until_ready(grad(params, x))
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            jax.block_until_ready(grad(params, x))
            best = min(best, time.perf_counter() - started)
        return best

    rows = []
    for micro in (1, 2, 4, 8, 16):
        piped = seconds(gpipe(stages, micro), ParallelConfig(stage=stages, data=-1, fsdp=1), micro)
        even = seconds(scan_layers, ParallelConfig(data=-1, fsdp=1), micro)
        rows.append({"microbatches": micro, "pipelined_s": piped, "even_s": even, "measured": 1 - even / piped,
                     "formula": bubble_fraction(stages, micro)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", type=int, default=12, help="layouts measured per model, spread over the ranking")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    import models
    from fax import load_config
    from fax.trainer import layout_timer
    from parallel.calibrate import calibrate
    from parallel.hardware import cluster_preset, present_cluster
    from parallel.planner import plan

    results: dict = {"speed_s": {}, "quality": {}, "bubble": []}
    for name, cluster, batch, seq in (("gpt3-175b", "h100-1024", 1536, 2048), ("llama-70b", "v4-1024", 1024, 4096)):
        started = time.perf_counter()
        best = plan(models.preset(name), cluster_preset(cluster), batch, seq, name)
        seconds = time.perf_counter() - started
        results["speed_s"][f"{name}@{cluster}"] = seconds
        print(f"plan {name} on {cluster}: {seconds:.2f} s, {best.searched} layouts; pick "
              f"{best.best.candidate.describe()}, predicted MFU {best.best.mfu:.2f}")
    print("pipeline bubble, 4 stages, microbatches of a fixed size (forward + backward of the stack):")
    for r in measure_bubble():
        results["bubble"].append(r)
        print(f"    M={r['microbatches']:>2}  pipelined {r['pipelined_s'] * 1e3:7.1f} ms  even {r['even_s'] * 1e3:7.1f} ms"
              f"  bubble measured {r['measured']:.2f}  formula (S-1)/(M+S-1) {r['formula']:.2f}")
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
