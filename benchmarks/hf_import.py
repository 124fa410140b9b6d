"""Importing a Hugging Face checkpoint of ~1 GB: wall time and peak host memory of fax's import
(``fax.interop.hf.import_params``: each parameter built in its sharding from the slices its devices
hold) against transformers' ``from_pretrained`` of the same folder, each in a fresh process, side by
side in one run; ratios printed, JSON under benchmarks/results/.

    python benchmarks/hf_import.py [--layers 4 --shard-mb 300 --cpu-devices 8]

The checkpoint is a Llama of random weights saved by transformers in float32 safetensors shards, as
checkpoints are published. Memory is the process's anonymous resident memory (sampled): the pages of the
mapped files either reads are the page cache's. Here the devices are this host's CPUs, so fax's
imported model is itself anonymous host memory; the figure to compare is the transient, the peak less
the loaded model's bytes: what a TPU or GPU host would hold beyond its devices' slices (fax's goal: no
more than a device's slice of a tensor at a time). transformers' weights may stay views of the mapped
files (no anonymous memory at all) until moved to a device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def anonymous() -> int:
    """This process's anonymous resident memory (what it cannot give back; mapped file pages it reads
    are the page cache's, dropped under pressure)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakMemory:
    """The peak of ``anonymous()`` while it is open, sampled every few milliseconds."""

    def __enter__(self) -> PeakMemory:
        self.start, self.peak, self.running = anonymous(), anonymous(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, anonymous())
            time.sleep(0.002)

    def __exit__(self, *_: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anonymous())


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
    with PeakMemory() as memory:
        started = time.perf_counter()
        params = jax.block_until_ready(hf.import_params(folder, cfg, shardings))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_above_start": memory.peak - memory.start,
            "model_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "devices": cpu_devices}


def load_with_transformers(folder: str) -> dict:
    import torch
    import transformers

    with PeakMemory() as memory:
        started = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        seconds = time.perf_counter() - started
        # its weights may still be views of the mapped files, read when first used: touched here, as any use would
        touched = sum(float(p.detach().abs().sum()) for p in model.parameters())
    return {"seconds": seconds, "peak_above_start": memory.peak - memory.start, "touched": touched,
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
        sizes = [f.stat().st_size for f in Path(folder).glob("*.safetensors")]
        runs: dict[str, list[dict]] = {"fax": [], "transformers": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(child(kind, folder, args.cpu_devices))
    best = {kind: min(r, key=lambda x: x["seconds"]) | {"peak_above_start": min(x["peak_above_start"] for x in r)}
            for kind, r in runs.items()}
    # Host memory beyond the model's weights: fax's imported arrays are anonymous memory here (CPU devices);
    # transformers' weights are views of the mapped files, so all of its anonymous peak is beyond them.
    best["fax"]["beyond_model"] = best["fax"]["peak_above_start"] - best["fax"]["model_bytes"]
    best["transformers"]["beyond_model"] = best["transformers"]["peak_above_start"]
    mib = 2 ** 20
    result = {"checkpoint_bytes": sum(sizes), "files": len(sizes), "largest_file_bytes": max(sizes), "runs": runs,
              "best": best,
              "time_ratio_fax_over_transformers": best["fax"]["seconds"] / best["transformers"]["seconds"],
              "beyond_model_ratio_fax_over_transformers": best["fax"]["beyond_model"] / best["transformers"]["beyond_model"]}
    print(f"checkpoint: {sum(sizes) / mib:.0f} MiB in {len(sizes)} safetensors files (largest {max(sizes) / mib:.0f} MiB)")
    for kind, b in best.items():
        print(f"  {kind:<13} {b['seconds']:6.2f} s   anonymous peak above start {b['peak_above_start'] / mib:6.0f} MiB"
              f"   beyond the weights {b['beyond_model'] / mib:5.0f} MiB")
    print(f"fax / transformers: time {result['time_ratio_fax_over_transformers']:.2f}x, host memory beyond the "
          f"weights {result['beyond_model_ratio_fax_over_transformers']:.2f}x (the largest tensor: "
          f"{32000 * 2048 * 4 / mib:.0f} MiB, a device's slice of it {32000 * 2048 * 4 / args.cpu_devices / mib:.0f} MiB)")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
