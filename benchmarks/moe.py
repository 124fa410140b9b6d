"""A mixture of experts beside the dense model of the same active FLOPs, on 8 emulated devices.

    python benchmarks/moe.py [--rounds 3]

The dense model: 4 layers of width 256, an MLP of 1024. The mixture: the same attention, 8 experts of
512 each, top-2 (1024 active, as the dense MLP), softmax router. Each runs train steps on the same
batch, the layouts and dispatches side by side, alternating rounds (this machine is shared): the
grouped-matmul dropless dispatch and the capacity dispatch (factor 1.25) over fsdp=8 (every device
all experts), expert=8 and expert=4 x fsdp=2. Printed: median step time, its ratio to the dense
model's, the compiled scratch memory per device, the share of assignments dropped, the loss after the
first step. Results in benchmarks/results/moe.json.

XLA's CPU backend has no grouped matmul: it computes ``ragged_dot`` as a dense matmul per expert,
masked, so on CPU the dropless dispatch pays every expert's FLOPs for every row. With ``--tpu v5e-8``
(the tpu extra) each run's step is also compiled, in bfloat16, for a TPU slice that is not here, and
XLA's FLOPs and scratch memory per device are printed beside the dense model's: there ``ragged_dot``
is a grouped-matmul kernel that computes the rows it is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax

SHAPE = ["model=llama-tiny", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1024",
         "model.n_layers=4", "model.max_seq_len=128", "train.seq_len=128", "model.vocab_size=4096"]
MOE = ["model.moe_experts=8", "model.moe_top_k=2", "model.moe_d_ff=512"]
CAPACITY = ["model.moe_dispatch=capacity", "model.moe_capacity_factor=1.25"]
RUNS = {"dense fsdp=8": ["parallel.fsdp=8"],
        "moe dropless fsdp=8": MOE + ["parallel.fsdp=8"],
        "moe dropless expert=8": MOE + ["parallel.fsdp=1", "parallel.expert=8"],
        "moe dropless expert=4 fsdp=2": MOE + ["parallel.fsdp=2", "parallel.expert=4"],
        "moe capacity fsdp=8": MOE + CAPACITY + ["parallel.fsdp=8"],
        "moe capacity expert=8": MOE + CAPACITY + ["parallel.fsdp=1", "parallel.expert=8"],
        "moe capacity expert=4 fsdp=2": MOE + CAPACITY + ["parallel.fsdp=2", "parallel.expert=4"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps timed per round")
    p.add_argument("--batch", type=int, default=32, help="rows of 128 tokens per step")
    p.add_argument("--tpu", default="", help="also compile each step for this TPU slice (e.g. v5e-8) and compare "
                                              "XLA's FLOPs and memory")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from fax import load_config
    from fax.config import validate
    from fax.data import Batch
    from fax.models.config import train_flops_per_token
    from timed_steps import prepared, time_alternating

    tokens = Batch.of(np.random.default_rng(0).integers(0, 4096, (args.batch, 129)))
    runs = {}
    for name, extra in RUNS.items():
        cfg = load_config(overrides=SHAPE + extra + [f"train.batch_size={args.batch}"])
        validate(cfg, len(jax.devices()))
        run = runs[name] = prepared(cfg, tokens)
        run["dropped"] = float(run["metrics"].get("moe_dropped", 0.0))
        run["flops_per_token"] = train_flops_per_token(cfg.model, cfg.seq_len)
    time_alternating(runs, args.rounds, args.steps)
    dense = statistics.median(runs["dense fsdp=8"]["times"])
    rows = []
    print(f"{args.batch} rows of 128 tokens a step, 8 emulated devices ({jax.devices()[0].device_kind})")
    for name, run in runs.items():
        seconds = statistics.median(run["times"])
        row = {"run": name, "step_s": seconds, "over_dense": seconds / dense, "loss": run["loss"],
               "dropped": run["dropped"], "temp_mib": run["temp_bytes"] / 2**20,
               "flops_per_token": run["flops_per_token"]}
        rows.append(row)
        print(f"  {name:<30} {seconds * 1e3:8.1f} ms  x{row['over_dense']:.2f} of dense  temp {row['temp_mib']:6.1f} MiB"
              f"  dropped {row['dropped']:.3f}  loss {row['loss']:.4f}  {row['flops_per_token'] / 1e6:.1f} MFLOP/token")
    by_run = {row["run"]: row["step_s"] for row in rows}
    dispatch = {layout: by_run[f"moe dropless {layout}"] / by_run[f"moe capacity {layout}"]
                for layout in ("fsdp=8", "expert=8", "expert=4 fsdp=2")}
    best = min(row["over_dense"] for row in rows if row["run"].startswith("moe"))
    print(f"best mixture / dense: {best:.2f} (goal <= 1.5); dropless / capacity: "
          + ", ".join(f"{k} {v:.2f}" for k, v in dispatch.items()))
    compiled = tpu_figures(args.tpu, args.batch) if args.tpu else {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{jax.devices()[0].device_kind}, 8 emulated devices", "batch": args.batch,
                               "rows": rows, "best_moe_over_dense": best, "dropless_over_capacity": dispatch,
                               "tpu": compiled}, indent=2))


def tpu_figures(cluster: str, batch: int) -> dict[str, dict[str, float]]:
    """Each run's step compiled for the TPU slice ``cluster`` in bfloat16: XLA's FLOPs and scratch
    memory per device, and the FLOPs over the dense model's."""
    from fax import load_config
    from fax.checkpoint import abstract_like
    from fax.parallel import make_mesh
    from fax.train import step as step_lib
    from fax.train.aot import target_devices

    devices, _, _ = target_devices(cluster)
    figures = {}
    print(f"compiled for {cluster} (bfloat16), per device:")
    for name, extra in RUNS.items():
        cfg = load_config(overrides=SHAPE + extra + [f"train.batch_size={batch}", "model.dtype=bfloat16"])
        training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
        state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
        step = step_lib.compile_step(training, state, (batch, cfg.seq_len + 1))
        figures[name] = {"flops": float(step.cost_analysis()["flops"]),
                         "temp_mib": step.memory_analysis().temp_size_in_bytes / 2**20}
        figures[name]["flops_over_dense"] = figures[name]["flops"] / figures["dense fsdp=8"]["flops"]
        print(f"  {name:<30} {figures[name]['flops'] / 1e9:8.2f} GFLOP  x{figures[name]['flops_over_dense']:.2f} "
              f"of dense  temp {figures[name]['temp_mib']:6.1f} MiB")
    return figures


if __name__ == "__main__":
    main()
