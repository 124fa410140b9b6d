"""Decode throughput of the serving engine, side by side in one run on the same model shape and
prompts: KV-cache decode vs recomputing the whole forward pass for every token, vs Hugging Face
transformers' `generate` (PyTorch, the same GPT-2 shape with random weights, its KV cache), at
batch 1, 4 and 16: whole generations (prompt and new tokens) and the decode alone (a generation's
time less that of its first token). The runs take turns, round after round, and each keeps its fastest
round, so that a shared machine's drift reaches both alike. On a GPU both run on it (PyTorch with TF32
matmuls, as JAX's default precision does for float32); on the CPU, ``--cpu-devices 8`` adds a
tensor-parallel engine over emulated devices.

    pip install torch==2.13.0 transformers   # the CPU wheel; see the README
    python benchmarks/generate.py [--model gpt-mini --new-tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import jax


def transformers_baseline(cfg, prompts: list[list[int]]):
    """Hugging Face GPT-2 of the same shape (random weights): greedy `generate` with its KV cache,
    as a function of (batch, new tokens). None (and a note) where torch or transformers is not installed."""
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"(no transformers baseline: {e}; pip install torch==2.13.0 transformers)")
        return None
    config = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                                     n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                                     bos_token_id=None, eos_token_id=None)  # GPT-2's ids lie outside a small vocabulary
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    model = transformers.GPT2LMHeadModel(config).eval().to(device)
    print(f"transformers {transformers.__version__}, torch {torch.__version__} on {device} "
          f"({torch.get_num_threads()} threads)")

    def run(batch: int, new_tokens: int) -> None:
        ids = torch.tensor(prompts[:batch], device=device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-mini")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="emulated CPU devices; with more than one, also a tensor-parallel engine over them (the "
                        "emulation slows even the single-device engine by 20-30%%, so the comparison runs on one)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.json"))
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fax import models
    from fax.serving.batching import generate
    from fax.serving.engine import Engine
    from fax.serving.engine import serving_mesh
    from fax.serving.sampling import SamplingParams
    from fax.parallel.calibrate import race

    cfg = models.preset(args.model)
    window = args.prompt_tokens + args.new_tokens
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, window))
    graphdef, state = nnx.split(models.build(cfg, seed=0))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, args.prompt_tokens)) for _ in range(16)]
    greedy, first = (SamplingParams(max_new_tokens=n, temperature=0.0) for n in (args.new_tokens, 1))

    results: dict[str, float] = {}
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=16)
    forward = jax.jit(functools.partial(models.apply, graphdef))

    def recompute(batch: int) -> None:
        tokens = np.zeros((batch, window), np.int32)
        tokens[:, :args.prompt_tokens] = np.array(prompts[:batch])
        for i in range(args.prompt_tokens, window):
            tokens[:, i] = np.asarray(jnp.argmax(forward(params, tokens)[:, i - 1], axis=-1))

    def record(best: dict[str, float], batch: int) -> None:
        """Tokens/s of each raced generation, whole and less its first token (its ``_first`` run)."""
        for name in (n for n in best if not n.endswith("_first")):
            results[f"{name}_b{batch}"] = batch * args.new_tokens / best[name]
            results[f"{name}_decode_b{batch}"] = batch * (args.new_tokens - 1) / (best[name] - best[f"{name}_first"])

    hf_generate = transformers_baseline(cfg, prompts)
    results["recompute_b1"] = args.new_tokens / race({"recompute": lambda: recompute(1)}, 1)["recompute"]
    for batch in (1, 4, 16):
        runs = {"kv": lambda: generate(engine, prompts[:batch], [greedy] * batch),
                "kv_first": lambda: generate(engine, prompts[:batch], [first] * batch)}
        if hf_generate:
            runs |= {"transformers": lambda: hf_generate(batch, args.new_tokens),
                     "transformers_first": lambda: hf_generate(batch, 1)}
        record(race(runs, args.rounds), batch)
    # logprobs: a finished request's prompt and completion scored in one forward pass
    completion = generate(engine, prompts[:1], [greedy])[0]
    score = race({"score": lambda: engine.score(prompts[0] + completion)}, args.rounds)["score"]
    results["score_share_b1"] = score * results["kv_b1"] / args.new_tokens
    if len(jax.devices()) > 1:
        sharded = Engine(cfg, params, serving_mesh(cfg, jax.devices()), max_batch=16)
        tensor_parallel = race({"tp": lambda: generate(sharded, prompts, [greedy] * 16)}, args.rounds)["tp"]
        results["kv_b16_tensor_parallel"] = 16 * args.new_tokens / tensor_parallel

    print(f"{args.model} ({models.param_count(cfg) / 1e6:.1f}M params), prompt {args.prompt_tokens} + "
          f"{args.new_tokens} new tokens, greedy, one {jax.devices()[0].device_kind} device unless noted")
    print(f"  recompute everything, batch 1: {results['recompute_b1']:8.1f} tokens/s")
    for batch in (1, 4, 16):
        line = (f"  KV cache, batch {batch:>2}: {results[f'kv_b{batch}']:8.1f} tokens/s "
                f"(decode alone {results[f'kv_decode_b{batch}']:8.1f})")
        if f"transformers_b{batch}" in results:
            line += (f"   transformers {results[f'transformers_b{batch}']:7.1f} "
                     f"({results[f'transformers_decode_b{batch}']:7.1f});  fax / transformers "
                     f"{results[f'kv_b{batch}'] / results[f'transformers_b{batch}']:.2f}x "
                     f"(decode alone {results[f'kv_decode_b{batch}'] / results[f'transformers_decode_b{batch}']:.2f}x)")
        print(line)
    if "kv_b16_tensor_parallel" in results:
        print(f"  KV cache, batch 16, tensor-parallel over {len(jax.devices())} devices: "
              f"{results['kv_b16_tensor_parallel']:.1f} tokens/s")
    print(f"  KV cache / recompute at batch 1: {results['kv_b1'] / results['recompute_b1']:.2f}x; "
          f"batch 16 / batch 1: {results['kv_b16'] / results['kv_b1']:.2f}x")
    print(f"  logprobs (scoring prompt + completion) add {results['score_share_b1']:.0%} to a batch-1 generation")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "device": jax.devices()[0].device_kind, "tokens_per_s": results},
                              indent=2))


if __name__ == "__main__":
    main()
