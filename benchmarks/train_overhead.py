"""What the Trainer costs over a bare jax.jit loop, and what the layer scan saves in compile time.

Both loops run the same compiled step on the same mesh and batch shape, alternately, in one
process; the median over rounds is compared (this machine is shared and noisy). Compile time is
measured for 4, 8, 16 and 32 layers.

    python benchmarks/train_overhead.py [--steps 30 --rounds 3 --cpu-devices 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-mini")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_overhead.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)


    from fax import Trainer, apply_overrides, load_config
    from fax.train import step as step_lib
    from fax.data import Sampler, TokenDataset, default_corpus
    from fax.parallel import make_mesh

    overrides = [f"model={args.model}", f"train.steps={args.steps}", f"train.log_every={args.steps}",
                 "train.sample_tokens=0", "checkpoint.every_n_steps=0"]
    cfg = load_config(overrides=overrides)
    tokens_per_step = cfg.train.batch_size * cfg.seq_len

    # The bare loop: the same pure step, jitted by hand, fed one device-resident batch.
    mesh = make_mesh(cfg.parallel)
    training = step_lib.build(cfg, mesh)
    batch = jax.device_put(Sampler(TokenDataset.open(default_corpus()), cfg.train.batch_size, cfg.seq_len, 0).batch(0),
                           training.batch_sharding)
    bare_state = training.init()
    bare_state, metrics = training.step(bare_state, batch)  # compile
    jax.block_until_ready(metrics)

    def bare_round() -> float:
        nonlocal bare_state
        start = time.perf_counter()
        for _ in range(args.steps):
            bare_state, m = training.step(bare_state, batch)
        jax.block_until_ready(m)
        return (time.perf_counter() - start) / args.steps

    def trainer_round() -> float:
        with tempfile.TemporaryDirectory() as run_dir:  # a fresh run each round, not a resume
            history = Trainer(apply_overrides(cfg, [f"run_dir={run_dir}"]), echo=lambda _: None).fit()
        return history[-1]["step_time_s"]  # the whole loop is one logging window

    bare, framework = [], []
    for r in range(args.rounds):
        bare.append(bare_round() * 1e3)
        framework.append(trainer_round() * 1e3)
        print(f"round {r + 1}: bare {bare[-1]:.1f} ms/step, Trainer {framework[-1]:.1f} ms/step")
    bare_ms, trainer_ms = statistics.median(bare), statistics.median(framework)
    ratio = statistics.median(f / b for f, b in zip(framework, bare))  # paired: each round shares its noise
    print(f"\n{args.model} on {len(jax.devices())} devices, {tokens_per_step} tokens/step")
    print(f"bare jax.jit loop {bare_ms:.1f} ms/step ({tokens_per_step / bare_ms * 1e3:,.0f} tokens/s)")
    print(f"fax Trainer       {trainer_ms:.1f} ms/step ({tokens_per_step / trainer_ms * 1e3:,.0f} tokens/s)")
    print(f"Trainer / bare = {ratio:.3f}, median of per-round ratios (overhead {100 * (ratio - 1):+.1f}%, goal < 3%)")

    print("\ncompile time vs layer count (scan over layers):")
    compile_s = {}
    for layers in (4, 8, 16, 32):
        c = load_config(overrides=[*overrides, f"model.n_layers={layers}"])
        t = step_lib.build(c, mesh)
        state = jax.eval_shape(t.init)
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                             t.state_shardings)
        start = time.perf_counter()
        step_lib.compile_step(t, state, (c.train.batch_size, c.seq_len + 1))
        compile_s[layers] = time.perf_counter() - start
        print(f"  {layers:>2} layers: {compile_s[layers]:.2f}s")
    print(f"  32 layers / 4 layers = {compile_s[32] / compile_s[4]:.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "devices": len(jax.devices()), "tokens_per_step": tokens_per_step,
        "bare_ms_per_step": bare, "trainer_ms_per_step": framework, "ratio": ratio,
        "compile_s_by_layers": compile_s}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
