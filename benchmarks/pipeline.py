"""Pipeline schedules side by side on 8 emulated devices: GPipe, stage_remat, interleaved (V = 2, with stage_remat).

    python benchmarks/pipeline.py [--rounds 3]

Train steps of one model over 4 stages x fsdp 2, at M = 4, 8, 16 microbatches of the same size,
for each schedule and for the same step without a pipeline (the 8 devices as fsdp, the rows
accumulated M / 2 microbatches at a time): the loss (equal in every row of an M), the median step time
over alternating rounds, its ratio to GPipe's, the compiled scratch memory per device, and the bubble
measured against the formula. On emulated devices every stage computes at every tick, the bubble's
too, so a step takes about ticks x one tick's work. GPipe does the unpipelined step's work: its
measured bubble is 1 - unpipelined / GPipe, the formula (S - 1) / (M + S - 1). Interleaved and
stage_remat do the same work as each other (a forward pass more): interleaved / stage_remat is
measured against the ratio of their ticks of equal work, (V M + S - 1) / (V (M + S - 1)).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax

SHAPE = ["model=llama-tiny", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1024",
         "model.n_layers=8", "model.max_seq_len=128", "train.seq_len=128", "model.vocab_size=4096"]
SCHEDULES = {"unpipelined": ["parallel.fsdp=8"],  # microbatches: M / 2 (below), so each splits over the 8
             "gpipe": ["parallel.stage=4", "parallel.fsdp=2"],
             "stage_remat": ["parallel.stage=4", "parallel.fsdp=2", "parallel.stage_remat=true"],
             "interleaved": ["parallel.stage=4", "parallel.fsdp=2", "parallel.virtual_stages=2",
                             "parallel.stage_remat=true"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps timed per round")
    p.add_argument("--rows", type=int, default=4, help="rows per microbatch")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from fax import load_config
    from fax.config import validate
    from fax.data import Batch
    from timed_steps import prepared, time_alternating

    rows = []
    for micro in (4, 8, 16):
        tokens = Batch.of(np.random.default_rng(0).integers(0, 4096, (args.rows * micro, 129)))
        runs = {}
        for name, extra in SCHEDULES.items():
            accumulated = micro // 2 if name == "unpipelined" else micro
            cfg = load_config(overrides=SHAPE + extra + ["parallel.data=1", f"train.microbatches={accumulated}",
                                                         f"train.batch_size={args.rows * micro}"])
            validate(cfg, len(jax.devices()))
            runs[name] = prepared(cfg, tokens)
        time_alternating(runs, args.rounds, args.steps)
        base = statistics.median(runs["unpipelined"]["times"])
        gpipe = statistics.median(runs["gpipe"]["times"])
        print(f"M={micro} ({args.rows * micro} rows of 128 tokens):")
        for name, run in runs.items():
            seconds = statistics.median(run["times"])
            row = {"microbatches": micro, "schedule": name, "loss": run["loss"], "step_s": seconds,
                   "over_gpipe": seconds / gpipe, "temp_mib": run["temp_bytes"] / 2**20}
            bubble = ""
            if name == "gpipe":
                row["bubble_measured"], row["bubble_formula"] = 1 - base / seconds, 3 / (micro + 3)
                bubble = f"  bubble {row['bubble_measured']:.2f} (formula {row['bubble_formula']:.2f})"
            if name == "interleaved":
                row["over_stage_remat"] = seconds / statistics.median(runs["stage_remat"]["times"])
                row["over_stage_remat_formula"] = (2 * micro + 3) / (2 * (micro + 3))
                bubble = (f"  / stage_remat {row['over_stage_remat']:.2f} (formula "
                          f"{row['over_stage_remat_formula']:.2f})")
            rows.append(row)
            print(f"    {name:<24} loss {run['loss']:.6f}  {seconds * 1e3:8.1f} ms  x{row['over_gpipe']:.2f} of gpipe"
                  f"  temp {row['temp_mib']:7.1f} MiB{bubble}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{jax.devices()[0].device_kind}, 8 emulated devices", "rows": rows},
                              indent=2))


if __name__ == "__main__":
    main()
