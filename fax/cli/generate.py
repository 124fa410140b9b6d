"""``fax generate``: continue a prompt (or answer a chat message) with a run's model, streamed."""

from __future__ import annotations

import argparse

from fax.cli.options import add_sampling_options

HELP = "continue a prompt with a trained run's model (KV cache, streamed)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help=HELP)
    p.add_argument("run_dir", help="a run directory, or hf:DIR (a Hugging Face folder)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="the prompt is a user's message to a chat-tuned run "
                                                       "(fax prepare --messages-field): print the reply")
    add_sampling_options(p, max_tokens=100, temperature=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.data import chat
    from fax.serving.batching import stream
    from fax.serving.engine import Engine
    from fax.serving.sampling import SamplingParams, request_problems
    from fax.interop.sources import source_config
    from fax.serving.text import TextStream, generation_ends, run_tokenizer

    tokenizer = run_tokenizer(source_config(args.run_dir))
    conversation = chat.layout(tokenizer)
    engine = Engine.from_run_dir(args.run_dir, step=args.step, max_batch=1,
                                 end_ids=generation_ends(tokenizer, conversation))
    stop = tuple(args.stop or ())
    sampling = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=conversation.reply_stops(stop) if args.chat else stop,
                              frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
    # A chat: the message laid out as /v1/chat/completions does it
    prompt = (conversation.prompt_ids(tokenizer.encode, [{"role": "user", "content": args.prompt}]) if args.chat
              else [int(t) for t in tokenizer.encode(args.prompt)])
    problems = request_problems(engine.cfg, prompt, sampling)
    if problems:
        raise ConfigError("; ".join(problems))
    if not args.chat:  # the prompt, then its continuation (a chat: the reply alone)
        print(args.prompt, end="", flush=True)
    text = TextStream(tokenizer, sampling.stop)
    for (token,) in stream(engine, [prompt], [sampling]):
        if token is not None and not text.stopped:
            print(text.push(token), end="", flush=True)
    print(text.flush())
    return 0
