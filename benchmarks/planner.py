"""Planner speed on large presets, and quality on the present devices.

    python benchmarks/planner.py [--measure 12]

Speed: seconds to plan GPT-3 175B on h100-1024 and Llama 70B on v4-1024 (goal < 10 s each).
Quality: on the 8 emulated devices, the step time of the planner's top ``--measure`` candidates
(remat none, for two model sizes) is measured; printed: the pick's measured time / the best
measured, and Spearman's rank correlation between predicted and measured step times.
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


def measure(model: str, candidate, batch: int, seq: int, steps: int = 3) -> float:
    import numpy as np

    from fax import load_config
    from fax import step as step_lib
    from parallel import make_mesh

    c = candidate
    cfg = load_config(overrides=[f"model={model}", f"train.batch_size={batch}", f"train.seq_len={seq}",
                                 f"train.microbatches={c.microbatches}", f"model.remat={c.remat}",
                                 *(f"parallel.{k}={v}" for k, v in c.axes.items())])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()))
    state = training.init()
    tokens = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, seq + 1), dtype=np.int32),
                            training.batch_sharding)
    state, metrics = training.step(state, tokens)
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = training.step(state, tokens)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - started) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", type=int, default=12, help="candidates measured per model on this machine")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    import models
    from parallel.hardware import cluster_preset, present_cluster
    from parallel.planner import plan

    results: dict = {"speed_s": {}, "quality": {}}
    for name, cluster, batch, seq in (("gpt3-175b", "h100-1024", 1536, 2048), ("llama-70b", "v4-1024", 1024, 4096)):
        started = time.perf_counter()
        best = plan(models.preset(name), cluster_preset(cluster), batch, seq, name)
        seconds = time.perf_counter() - started
        results["speed_s"][f"{name}@{cluster}"] = seconds
        print(f"plan {name} on {cluster}: {seconds:.2f} s, {best.searched} layouts; pick "
              f"{best.best.candidate.describe()}, predicted MFU {best.best.mfu:.2f}")
    here = present_cluster()
    for name, batch, seq in (("gpt-tiny", 16, 128), ("gpt-mini", 16, 128)):
        result = plan(models.preset(name), here, batch, seq, name, top=10_000, max_stages=1)
        pool = [e for e in result.ranked if e.candidate.remat == "none"][:args.measure]
        measured = [measure(name, e.candidate, batch, seq) for e in pool]
        predicted = [e.step_s for e in pool]
        ratio = measured[0] / min(measured)
        rho = spearman(predicted, measured)
        results["quality"][name] = {"pick_over_best": ratio, "spearman": rho,
                                    "rows": [(e.candidate.describe(), e.step_s, m) for e, m in zip(pool, measured)]}
        print(f"{name}: {len(pool)} layouts measured; pick / measured best = {ratio:.2f}, "
              f"rank correlation predicted vs measured = {rho:.2f}")
        for e, m in sorted(zip(pool, measured), key=lambda x: x[1]):
            print(f"    {e.candidate.describe():<44} predicted {e.step_s * 1e3:8.1f} ms  measured {m * 1e3:8.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
