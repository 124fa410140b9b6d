"""LoRA vs full fine-tuning, side by side in one run: step time and optimizer-state memory.

    python benchmarks/finetune.py [--model gpt-mini] [--rank 8] [--steps 10]
    python benchmarks/finetune.py --model llama-1b --batch 8 --seq 2048 \
        --set model.dtype=bfloat16 model.remat=dots_with_no_batch_dims_saveable     # on a GPU

Same model, batch and mesh (the local devices); LoRA adapts attn.wq, attn.wv (the default targets).
Printed: ms per step, trainable parameters and optimizer-state bytes of each, and the ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np


def measure(overrides: list[str], steps: int) -> dict:
    from fax import load_config
    from fax.train import step as step_lib
    from fax.train.planning import timed_steps
    from fax.parallel import make_mesh

    cfg = load_config(overrides=overrides)
    training = step_lib.build(cfg, make_mesh(cfg.parallel))
    state, times = timed_steps(training, cfg, steps)
    trained = step_lib.trainable(state["params"], cfg.lora)
    return {"step_s": float(np.median(times)), "trainable": sum(x.size for x in jax.tree.leaves(trained)),
            "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-mini")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides for both, e.g. model.dtype=bfloat16")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    common = [f"model={args.model}", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", *args.set]
    results = {"full": measure(common, args.steps), "lora": measure([*common, f"lora.rank={args.rank}"], args.steps)}
    for name, r in results.items():
        print(f"{name:>5}: {r['step_s'] * 1e3:8.1f} ms/step  {r['trainable']:>12,} trainable  "
              f"optimizer state {r['optimizer_bytes'] / 2 ** 20:8.2f} MiB")
    full, lora = results["full"], results["lora"]
    print(f"lora / full: step time {lora['step_s'] / full['step_s']:.2f}x, optimizer state "
          f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.4f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
