"""Ray mode (2 emulated hosts x 4 devices, one JAX process each) vs local mode (1 process x 8).

Same model, mesh (fsdp=8), batch and seed, one after the other in one run: steps/s (median
over the steps after the first two), the time from ``fit()`` to the first finished step, and the
time a Ray-mode run needs to recover from a killed worker (kill -> the next finished step, which
includes bring-up, restore and recompile). Ray mode with one host of 8 devices separates the cost
of the runtime (actor calls, batches through the object store) from that of cross-process
collectives (gloo over TCP between the two emulated hosts, which share this machine's cores).

    python benchmarks/runtime.py [--model gpt-mini --steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import jax


def timed_fit(overrides: list[str], kill_at: int = 0) -> dict[str, float]:
    from fax import Trainer, load_config

    trainer = Trainer(load_config(overrides=overrides), echo=lambda _: None)
    marks: dict[int, float] = {}
    killed: list[float] = []

    def mark(step: int, _: dict) -> None:
        marks.setdefault(step, time.perf_counter())
        if kill_at and step == kill_at and not killed:
            killed.append(time.perf_counter())
            os.kill(trainer.runtime.worker_pids()[1], signal.SIGKILL)

    trainer.add_hook(1, mark)
    started = time.perf_counter()
    with trainer:
        history = trainer.fit()
    times = [r["step_time_s"] for r in history if r["step"] > 2]
    result = {"first_step_s": marks[1] - started, "steps_per_s": 1 / statistics.median(times),
              "final_loss": history[-1]["loss"]}
    if killed:
        resumed = min(t for t in marks.values() if t > killed[0])
        result["recovery_s"] = resumed - killed[0]
        result["restarts"] = len(trainer.restarts)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-mini")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtime.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    root = Path(tempfile.mkdtemp(prefix="faxb", dir="/tmp"))
    base = [f"model={args.model}", f"train.steps={args.steps}", "train.log_every=1", "train.sample_tokens=0",
            "checkpoint.every_n_steps=5", "parallel.fsdp=8"]
    ray_mode = ["cluster.ray=true", "cluster.emulate_hosts=2", "cluster.devices_per_host=4",
                f"cluster.ray_temp_dir={root / 'ray'}", "cluster.heartbeat_timeout_s=10"]

    local = timed_fit([*base, f"run_dir={root / 'local'}"])
    one_host = timed_fit([*base, *ray_mode, "cluster.emulate_hosts=1", "cluster.devices_per_host=8",
                          f"run_dir={root / 'ray_one'}"])
    ray = timed_fit([*base, *ray_mode, f"run_dir={root / 'ray_run'}"])
    recovery = timed_fit([*base, *ray_mode, f"run_dir={root / 'ray_kill'}"], kill_at=args.steps // 2 + 2)

    print(f"{args.model}, fsdp=8, {args.steps} steps")
    runs = {"local 1x8": local, "ray 1x8": one_host, "ray 2x4": ray}
    print(f"{'':<26}" + "".join(f"{name:>12}" for name in runs) + f"{'1x8/local':>11}{'2x4/local':>11}")
    for key, label, fmt in (("steps_per_s", "steps/s", ".3f"), ("first_step_s", "fit() -> first step (s)", ".1f"),
                            ("final_loss", "final loss", ".5f")):
        ratios = "" if key == "final_loss" else \
            f"{one_host[key] / local[key]:>11.2f}{ray[key] / local[key]:>11.2f}"
        print(f"{label:<26}" + "".join(f"{r[key]:>12{fmt}}" for r in runs.values()) + ratios)
    print(f"recovery from a killed worker: {recovery['recovery_s']:.1f}s (kill -> next finished step, "
          f"{recovery['restarts']} restart), final loss {recovery['final_loss']:.5f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "steps": args.steps, "local": local, "ray_one_host": one_host, "ray": ray,
                               "recovery": recovery}, indent=2))


if __name__ == "__main__":
    main()
