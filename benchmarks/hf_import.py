"""Importing a Hugging Face checkpoint of ~1 GB: wall time and peak host memory of fax's import
(``fax.interop.hf.import_params``: each parameter built in its sharding from the slices its devices
hold) against transformers' ``from_pretrained`` of the same folder, each in a fresh process, side by
side in one run; ratios printed, JSON under benchmarks/results/.

    python benchmarks/hf_import.py [--layers 4 --shard-mb 300 --cpu-devices 8]

The checkpoint is a Llama of random weights saved by transformers in float32 safetensors shards, as
checkpoints are published. Here the devices are this host's CPUs, so the imported model itself is host
memory; the figure to compare is the transient: the peak above the loaded model's bytes, what a TPU or
GPU host would hold beyond its devices' slices (fax's goal: no more than the stored tensors it reads at
a time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def write_checkpoint(folder: str, layers: int, shard_mb: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")


def load_with_fax(folder: str, cpu_devices: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", cpu_devices)
    from fax.config import Config
    from fax.interop import hf
    from fax.params import param_layout
    from fax.parallel import ParallelConfig, make_mesh

    cfg = hf.model_config(hf.read_config(folder))
    *_, shardings = param_layout(Config(model=cfg), make_mesh(ParallelConfig(fsdp=cpu_devices), jax.devices()))
    before = rss()
    started = time.perf_counter()
    params = jax.block_until_ready(hf.import_params(folder, cfg, shardings))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_above_start": peak() - before,
            "model_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "devices": cpu_devices}


def load_with_transformers(folder: str) -> dict:
    import torch
    import transformers

    before = rss()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_above_start": peak() - before,
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def child(kind: str, folder: str, cpu_devices: int) -> dict:
    """One loader in a fresh process (its own peak), its figures as JSON on stdout's last line."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", folder,
                          "--cpu-devices", str(cpu_devices)], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shard-mb", type=int, default=300)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="loads of each, alternating; the best is kept")
    p.add_argument("--child", choices=["fax", "transformers", "write"])
    p.add_argument("--folder")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_import.json"))
    args = p.parse_args()
    if args.child:
        result = {"fax": lambda: load_with_fax(args.folder, args.cpu_devices),
                  "transformers": lambda: load_with_transformers(args.folder),
                  "write": lambda: write_checkpoint(args.folder, args.layers, args.shard_mb) or {}}[args.child]()
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="fax-bench-hf-") as folder:
        subprocess.run([sys.executable, __file__, "--child", "write", "--folder", folder, "--layers",
                        str(args.layers), "--shard-mb", str(args.shard_mb)], check=True, capture_output=True)
        files = sorted(Path(folder).glob("*.safetensors"))
        largest_file = max(f.stat().st_size for f in files)
        runs: dict[str, list[dict]] = {"fax": [], "transformers": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(child(kind, folder, args.cpu_devices))
    best = {kind: min(r, key=lambda x: x["seconds"]) | {"peak_above_start": min(x["peak_above_start"] for x in r)}
            for kind, r in runs.items()}
    for kind, b in best.items():
        b["transient"] = b["peak_above_start"] - b["model_bytes"]
    mib = 2 ** 20
    result = {"checkpoint_bytes": sum(f.stat().st_size for f in files), "files": len(files),
              "largest_file_bytes": largest_file, "runs": runs, "best": best,
              "time_ratio_fax_over_transformers": best["fax"]["seconds"] / best["transformers"]["seconds"],
              "peak_ratio_fax_over_transformers": best["fax"]["peak_above_start"] / best["transformers"]["peak_above_start"]}
    print(f"checkpoint: {result['checkpoint_bytes'] / mib:.0f} MiB in {len(files)} safetensors files "
          f"(largest {largest_file / mib:.0f} MiB)")
    for kind, b in best.items():
        print(f"  {kind:<13} {b['seconds']:6.2f} s   peak above start {b['peak_above_start'] / mib:7.0f} MiB   "
              f"transient (peak less the model) {b['transient'] / mib:6.0f} MiB")
    print(f"fax / transformers: time {result['time_ratio_fax_over_transformers']:.2f}x, "
          f"peak memory {result['peak_ratio_fax_over_transformers']:.2f}x")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
