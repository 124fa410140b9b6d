"""Checkpoint costs, side by side in one run, on a train state of several hundred MB:

(a) time the training loop is blocked by an async save vs a synchronous save (steady state: each
    round saves a new step through the same managers, as a training run does);
(b) save throughput (MB/s) vs writing the same arrays with plain np.save;
(c) restore throughput onto the same mesh and onto a different one, vs np.load;
(d) the cost of checksums: sync save and restore with checkpoint.checksums on vs off.

    python benchmarks/checkpoint.py [--layers 2 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="layers of a gpt2-small shaped model")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--compress", action="store_true", help="checkpoint.compress=true (zstd)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    import numpy as np

    from fax import load_config
    from fax.train import step as step_lib
    from fax.checkpoint import Checkpointer
    from fax.config import CheckpointConfig
    from fax.parallel import make_mesh

    cfg = load_config(overrides=["model=gpt2-small", f"model.n_layers={args.layers}"])
    training = step_lib.build(cfg, make_mesh(cfg.parallel))
    # Random values everywhere, as in a trained state: fresh Adam moments are zeros, which compress to
    # nothing and would flatter a compressing writer.
    state = jax.jit(lambda s: jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape, x.dtype)
                                           if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, s),
                    out_shardings=training.state_shardings)(training.init())
    state = jax.block_until_ready(state)
    leaves = jax.tree.leaves({"params": state["params"], "opt_state": state["opt_state"]})
    total_mb = sum(x.nbytes for x in leaves) / 2**20
    print(f"train state: {total_mb:.0f} MB in {len(leaves)} arrays over {len(jax.devices())} devices (fsdp)")

    other = load_config(overrides=["model=gpt2-small", f"model.n_layers={args.layers}", "parallel.fsdp=1",
                                   "parallel.tensor=4", "parallel.data=2"])
    other_training = step_lib.build(other, make_mesh(other.parallel))
    target = jax.eval_shape(training.init)
    root = Path(tempfile.mkdtemp(prefix="fax-bench-ckpt-"))
    results: dict[str, list[float]] = {k: [] for k in (
        "async_blocked_s", "sync_save_s", "npsave_s", "restore_same_s", "restore_other_s", "npload_s",
        "unchecked_save_s", "unchecked_restore_s")}
    sync = Checkpointer(str(root / "sync"), CheckpointConfig(async_save=False, max_to_keep=0, compress=args.compress))
    asyn = Checkpointer(str(root / "async"), CheckpointConfig(async_save=True, max_to_keep=0, compress=args.compress))
    unchecked = Checkpointer(str(root / "unchecked"), CheckpointConfig(async_save=False, max_to_keep=0,
                                                                      compress=args.compress, checksums=False))
    try:
        for r in range(args.rounds + 1):  # round 0 warms up orbax and the file cache
            step = r + 1

            def save_unchecked() -> float:
                start = time.perf_counter()
                unchecked.save(state, {"step": step}, wait=True)
                return time.perf_counter() - start

            # with and without checksums back to back, in turns first: the later one of a pair runs faster here
            unchecked_save_s = save_unchecked() if r % 2 else None
            start = time.perf_counter()
            sync.save(state, {"step": step}, wait=True)
            sync_s = time.perf_counter() - start
            unchecked_save_s = unchecked_save_s or save_unchecked()

            start = time.perf_counter()
            asyn.save(state, {"step": step})
            blocked_s = time.perf_counter() - start
            asyn.wait()

            npdir = root / f"np{r}"
            npdir.mkdir()
            start = time.perf_counter()
            for i, x in enumerate(leaves):
                np.save(npdir / f"{i}.npy", np.asarray(jax.device_get(x)))
            npsave_s = time.perf_counter() - start

            start = time.perf_counter()
            jax.block_until_ready(sync.restore(step, target, training.state_shardings)[0])
            same_s = time.perf_counter() - start
            start = time.perf_counter()
            jax.block_until_ready(sync.restore(step, target, other_training.state_shardings)[0])
            other_s = time.perf_counter() - start
            start = time.perf_counter()
            for i, x in enumerate(leaves):
                jax.block_until_ready(jax.device_put(np.load(npdir / f"{i}.npy"), x.sharding))
            npload_s = time.perf_counter() - start
            shutil.rmtree(npdir)
            start = time.perf_counter()
            jax.block_until_ready(unchecked.restore(step, target, training.state_shardings)[0])
            unchecked_restore_s = time.perf_counter() - start
            if r == 0:
                continue
            for key, value in zip(results, (blocked_s, sync_s, npsave_s, same_s, other_s, npload_s,
                                            unchecked_save_s, unchecked_restore_s)):
                results[key].append(value)
            print(f"round {r}: async blocked {blocked_s:.3f}s, sync save {sync_s:.2f}s, np.save {npsave_s:.2f}s, "
                  f"restore {same_s:.2f}s / other mesh {other_s:.2f}s, np.load {npload_s:.2f}s; without checksums "
                  f"save {unchecked_save_s:.2f}s, restore {unchecked_restore_s:.2f}s")
    finally:
        sync.close()
        asyn.close()
        unchecked.close()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    mbps = lambda s: total_mb / s  # noqa: E731
    print(f"\n(a) async save blocks the loop {med['async_blocked_s']:.3f}s vs sync {med['sync_save_s']:.2f}s: "
          f"{100 * med['async_blocked_s'] / med['sync_save_s']:.1f}% (goal < 10%)")
    print(f"(b) save {mbps(med['sync_save_s']):.0f} MB/s vs np.save {mbps(med['npsave_s']):.0f} MB/s: "
          f"{med['npsave_s'] / med['sync_save_s']:.2f}x (goal >= 0.8x)")
    print(f"(c) restore {mbps(med['restore_same_s']):.0f} MB/s same mesh, {mbps(med['restore_other_s']):.0f} MB/s "
          f"onto data=2 x tensor=4, np.load {mbps(med['npload_s']):.0f} MB/s: "
          f"{med['npload_s'] / med['restore_same_s']:.2f}x / {med['npload_s'] / med['restore_other_s']:.2f}x")
    print(f"(d) with checksums: save {mbps(med['sync_save_s']):.0f} MB/s vs {mbps(med['unchecked_save_s']):.0f} MB/s "
          f"without ({med['unchecked_save_s'] / med['sync_save_s']:.2f}x; goal >= 0.9x), restore "
          f"{mbps(med['restore_same_s']):.0f} vs {mbps(med['unchecked_restore_s']):.0f} MB/s "
          f"({med['unchecked_restore_s'] / med['restore_same_s']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"state_mb": total_mb, "seconds": results, "median_s": med}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
