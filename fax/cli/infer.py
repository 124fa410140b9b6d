"""``fax infer``: complete every prompt of a file (Ray Data, resumable)."""

from __future__ import annotations

import argparse

from fax.cli.options import add_sampling_options

HELP = "complete every prompt (or reply to every conversation) of a JSONL/Parquet file (Ray Data, resumable)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help=HELP)
    p.add_argument("run_dir", help="a run directory, or hf:DIR (a Hugging Face folder)")
    p.add_argument("--input", required=True, help="a .jsonl or .parquet file of prompts")
    p.add_argument("--output", required=True, help="a .jsonl or .parquet file (parts kept in OUTPUT.parts/)")
    p.add_argument("--field", default="prompt", help="the prompt's field or column")
    p.add_argument("--messages-field", default="",
                   help="instead of a prompt, the field of a conversation ({role, content} messages) to reply "
                        "to, laid out as in chat tuning (fax prepare --messages-field)")
    add_sampling_options(p, max_tokens=64, temperature=0.0)
    p.add_argument("--seed", type=int, default=0, help="row i samples with seed + i")
    p.add_argument("--max-batch", type=int, default=16, help="prompts one engine decodes together")
    p.add_argument("--workers", type=int, default=1, help="engines (Ray actors) working in parallel")
    p.add_argument("--engine", choices=("ray", "local"), default="ray")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.serving.infer import InferSettings, infer

    settings = InferSettings(args.field, args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             tuple(args.stop or ()), args.max_batch, args.messages_field, args.frequency_penalty,
                             args.presence_penalty)
    try:
        done = infer(args.run_dir, args.input, args.output, settings, args.workers, args.engine, progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    print(f"fax: {done['rows']} rows to {args.output} ({done['chunks_run']} chunks computed now, "
          f"{done['errors']} rows with an error)")
    return 0
