"""Tokens/s and MFU of the fax train step on the present accelerator (meant for one H100/H200),
side by side for several remat policies, attention implementations, loss chunkings and document
masking in one run.

Default: a ~1B Llama (llama-1b shape), sequence 2048, bf16 compute; for each (remat, attention)
variant it tries global batch sizes from the largest down until one fits, and reports tokens/s
and MFU against the device's dense bf16 peak (fax.metrics.PEAK_FLOPS), with each variant's
tokens/s as a ratio of the first's, and the scratch memory XLA planned for the step.

    python benchmarks/mfu.py                      # on the GPU
    python benchmarks/mfu.py --model llama-tiny --seq-len 128 --batches 8,4 --attention xla   # CPU check
    python benchmarks/mfu.py --model llama-tiny --set model.vocab_size=32768 --seq-len 256 --batches 8 \
        --attention xla --loss-chunks 1,4,16      # the logits' memory on the CPU
    python benchmarks/mfu.py --document-mask false,true   # what attention stopping at documents costs
"""

from __future__ import annotations

import argparse
import collections
import gzip
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np


def device_time_by_op(trace_dir: str, top: int) -> list[tuple[str, float]]:
    """The ``top`` GPU/TPU ops of a profiler trace by total time in ms, to see where a step's time
    goes (a CPU trace has no device rows: its XLA ops run on host threads)."""
    trace = json.load(gzip.open(sorted(Path(trace_dir).rglob("*.trace.json.gz"))[-1]))
    devices = {e["pid"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:" in e["args"]["name"]}
    totals: collections.Counter = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in devices:
            totals[e["name"]] += e["dur"] / 1e3
    return totals.most_common(top)


def measure(model: str, seq_len: int, batch: int, remat: str, attention: str, loss_chunks: int, document_mask: bool,
            steps: int, trace: str | None = None, settings: tuple[str, ...] = ()) -> dict | None:
    """One variant's step time at one batch size; None when it does not fit in device memory."""
    from fax import models
    from fax import load_config
    from fax.train import step as step_lib
    from fax.data import Batch
    from fax.metrics import mfu, peak_flops_per_device
    from fax.parallel import make_mesh
    from fax.parallel.validation import out_of_memory

    devices = jax.devices()
    cfg = load_config(overrides=[f"model={model}", f"model.max_seq_len={seq_len}", "model.dtype=bfloat16",
                                 f"model.remat={remat}", f"model.attention_impl={attention}",
                                 f"train.batch_size={batch}", f"train.seq_len={seq_len}",
                                 f"train.loss_chunks={loss_chunks}", f"data.document_mask={document_mask}",
                                 *settings])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
    rng = np.random.default_rng(0)
    ends = (rng.random((batch, seq_len + 1)) < 1 / 1024).astype(np.int32)  # documents ~1k long
    tokens = Batch.of(rng.integers(0, cfg.model.vocab_size, (batch, seq_len + 1)), segments=np.cumsum(ends, 1) - ends)
    try:
        state = training.init()
        data = jax.device_put(tokens, training.batch_sharding)
        step = step_lib.compile_step(training, state, tokens.shape)
        scratch = step.memory_analysis().temp_size_in_bytes
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / steps
        if trace:
            with jax.profiler.trace(trace):
                state, metrics = step(state, data)
                jax.block_until_ready(metrics)
    except Exception as e:  # out of memory: the caller tries a smaller batch
        if not out_of_memory(e):
            raise
        print(f"  {remat}/{attention}/loss_chunks={loss_chunks}/document_mask={document_mask} batch {batch}: "
              "does not fit "
              f"({str(e).splitlines()[0][:100]})")
        return None
    tokens_per_s = batch * seq_len / step_s
    peak = peak_flops_per_device(devices[0].device_kind, devices[0].platform, len(devices))
    return {"model": model, "params": models.param_count(cfg.model), "remat": remat, "attention": attention,
            "loss_chunks": loss_chunks, "document_mask": document_mask, "batch": batch, "seq_len": seq_len,
            "device": devices[0].device_kind,
            "devices": len(devices),
            "step_s": step_s, "tokens_per_s": tokens_per_s, "peak_flops": peak, "scratch_bytes": scratch,
            "mfu": mfu(models.train_flops_per_token(cfg.model, seq_len), tokens_per_s, peak, len(devices)),
            "loss": float(metrics["loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", default="16,8,4", help="global batch sizes to try, largest first")
    p.add_argument("--remat", default="dots_with_no_batch_dims_saveable", help="model.remat values, comma-separated")
    p.add_argument("--attention", default="cudnn", help="model.attention_impl values, comma-separated")
    p.add_argument("--loss-chunks", default="1", help="train.loss_chunks values, comma-separated")
    p.add_argument("--document-mask", default="false", help="data.document_mask values (false, true), comma-separated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config setting")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trace", help="also profile one step of each variant into this folder and print its top ops")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mfu.json"))
    args = p.parse_args()

    results = []
    variants = itertools.product(args.remat.split(","), args.attention.split(","),
                                 map(int, args.loss_chunks.split(",")),
                                 [m == "true" for m in args.document_mask.split(",")])
    for remat, attention, chunks, masked in variants:
        for batch in map(int, args.batches.split(",")):
            trace = args.trace and f"{args.trace}/{remat}-{attention}-{chunks}-{'masked' if masked else 'causal'}"
            result = measure(args.model, args.seq_len, batch, remat, attention, chunks, masked, args.steps, trace,
                             tuple(args.set))
            if result:  # the largest batch that fits
                results.append(result)
                if trace:
                    ops = device_time_by_op(trace, 25)
                    result["top_ops_ms"] = ops
                    print(f"{remat}/{attention}/loss_chunks={chunks}/document_mask={masked} batch {batch}: "
                          f"top device ops of one step ({result['step_s'] * 1e3:.0f} ms)")
                    for name, ms in ops or [("(no device ops in the trace)", 0.0)]:
                        print(f"  {ms:8.2f} ms  {name[:110]}")
                break
    first = results[0]
    print(f"{args.model} ({first['params'] / 1e9:.2f}B), sequence {args.seq_len}, on {first['devices']} "
          f"{first['device']} (peak {first['peak_flops'] / 1e12:.3g} TFLOP/s/device)")
    for r in results:
        print(f"  remat {r['remat']:<34} attention {r['attention']:<6} loss chunks {r['loss_chunks']:>3} "
              f"{'doc mask' if r['document_mask'] else 'causal  '} batch {r['batch']:>3}: "
              f"{r['step_s'] * 1e3:7.0f} ms/step  "
              f"scratch {r['scratch_bytes'] / 2 ** 30:6.2f} GiB {r['tokens_per_s']:>11,.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%  "
              f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x the first")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
