"""Tokens/s and MFU of the fax train step on the present accelerator (meant for one H100/H200).

Default: a ~1B Llama (llama-1b shape), sequence 2048, bf16 compute, cuDNN attention, trying
global batch sizes from the largest down until one fits; reports tokens/s and MFU against the
device's dense bf16 peak (fax.metrics.PEAK_FLOPS).

    python benchmarks/mfu.py                      # on the GPU
    python benchmarks/mfu.py --model llama-tiny --seq-len 128 --batches 8,4 --attention xla   # CPU check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", default="32,24,16,12,8,4", help="global batch sizes to try, largest first")
    p.add_argument("--remat", default="dots_with_no_batch_dims_saveable")
    p.add_argument("--attention", default="cudnn", help="model.attention_impl")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mfu.json"))
    args = p.parse_args()

    import models
    from fax import load_config
    from fax import step as step_lib
    from fax.metrics import mfu, peak_flops_per_device
    from parallel import make_mesh

    devices = jax.devices()
    results = []
    for batch in map(int, args.batches.split(",")):
        cfg = load_config(overrides=[f"model={args.model}", f"model.max_seq_len={args.seq_len}", "model.dtype=bfloat16",
                                     f"model.remat={args.remat}", f"model.attention_impl={args.attention}",
                                     f"train.batch_size={batch}", f"train.seq_len={args.seq_len}"])
        training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, args.seq_len + 1), np.int32)
        try:
            state = training.init()
            data = jax.device_put(tokens, training.batch_sharding)
            state, metrics = training.step(state, data)  # compile + first step
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = training.step(state, data)
            jax.block_until_ready(metrics)
        except Exception as e:  # out of memory: try the next, smaller batch
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"batch {batch}: does not fit ({str(e).splitlines()[0][:120]})")
            del training
            continue
        step_s = (time.perf_counter() - start) / args.steps
        tokens_per_s = batch * args.seq_len / step_s
        flops = models.train_flops_per_token(cfg.model, args.seq_len)
        peak = peak_flops_per_device(devices[0].device_kind, devices[0].platform, len(devices))
        result = {"model": args.model, "params": models.param_count(cfg.model), "batch": batch,
                  "seq_len": args.seq_len, "device": devices[0].device_kind, "devices": len(devices),
                  "step_s": step_s, "tokens_per_s": tokens_per_s, "mfu": mfu(flops, tokens_per_s, peak, len(devices)),
                  "loss": float(metrics["loss"])}
        results.append(result)
        print(f"{args.model} ({result['params'] / 1e9:.2f}B) batch {batch} x {args.seq_len} on {len(devices)} "
              f"{devices[0].device_kind}: {step_s * 1e3:.0f} ms/step, {tokens_per_s:,.0f} tokens/s, "
              f"MFU {100 * result['mfu']:.1f}% of {peak / 1e12:.3g} TFLOP/s/device")
        break  # the largest batch that fits
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
