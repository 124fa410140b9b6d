"""`fax prepare` throughput: Ray Data (map_batches, one file per task) vs one process, same files.

    python benchmarks/prepare.py [--files 400]

The corpus is the Python standard library's sources (real text, no download). Both engines run
with the byte tokenizer and with a BPE tokenizer (trained once on a sample, then given to both as a
tokenizer.json); every run starts from an empty output folder. Printed: tokens/s of each and the
ratio ray / local. Note: `tokenizers` already spreads a batch of documents over the cores inside
one process, and this machine has 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from fax.cluster.data import tokenize_on_ray
from fax.data import prepare, read_documents, stdlib_dir, text_files
from fax.data.tokenizers import train_bpe


def timed(files: list[Path], tokenizer: str, engine: str, root: Path) -> tuple[float, int]:
    out = root / f"{engine}-{Path(tokenizer).name}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    tokenize = tokenize_on_ray if engine == "ray" else None
    index = prepare(files, out, tokenizer, invalid_utf8="skip", tokenize=tokenize)
    return time.perf_counter() - started, index["num_tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare.json"))
    args = p.parse_args()
    files = sorted(text_files([stdlib_dir()], (".py",)), key=lambda f: -f.stat().st_size)[:args.files]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    root = Path(tempfile.mkdtemp(prefix="fax-prepare-bench-"))
    bpe = train_bpe((text for f in files[:50] for doc in read_documents(f, invalid_utf8="skip") for text, _ in doc), 8192, root / "bpe.json")
    print(f"{len(files)} files, {megabytes:.1f} MB; BPE vocabulary {bpe.vocab_size}")
    results = {}
    try:
        import ray

        ray.init(_temp_dir=tempfile.mkdtemp(prefix="fax-ray-", dir="/tmp"), include_dashboard=False,
                 log_to_driver=False)  # started once: its start-up is not tokenizing
        for tokenizer in ("byte", str(root / "bpe.json")):
            row = {}
            for engine in ("local", "ray"):
                seconds, tokens = timed(files, tokenizer, engine, root)
                row[engine] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
            name = "bpe" if tokenizer != "byte" else "byte"
            results[name] = row
            print(f"{name:>5}: local {row['local']['tokens_per_s']:>12,.0f} tokens/s   ray {row['ray']['tokens_per_s']:>12,.0f}"
                  f" tokens/s   ray / local {row['ray']['tokens_per_s'] / row['local']['tokens_per_s']:.2f}x")
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
