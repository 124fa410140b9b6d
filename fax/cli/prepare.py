"""``fax prepare``: tokenize files into a dataset folder that ``data.path`` reads."""

from __future__ import annotations

import argparse

HELP = "tokenize text, JSONL and Parquet files into the dataset format `data.path` reads"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help=HELP)
    p.add_argument("inputs", nargs="+", help="files or folders (walked recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="byte", help="byte, bpe (trained here on the inputs), or the path of "
                                                       "a tokenizer.json (e.g. one shipped with a HF checkpoint)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens of a bpe tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents kept for validation")
    p.add_argument("--text-field", default="text", help="the text of a JSONL record / Parquet row")
    p.add_argument("--prompt-field", default="", help="a record's prompt: read by the model before its text, "
                                                      "not trained on (instruction tuning); default: none")
    p.add_argument("--messages-field", default="", help="a record's conversation, a list of {role, content} "
                                                        "messages: only the assistant's are trained on (chat "
                                                        "tuning, served by /v1/chat/completions); default: none")
    p.add_argument("--invalid-utf8", choices=("refuse", "replace", "skip"), default="refuse",
                   help="a text or JSONL file that is not UTF-8: refuse it (default), replace each undecodable "
                        "byte sequence with U+FFFD, or skip the file; replaced and skipped are counted")
    p.add_argument("--engine", choices=("ray", "local"), default="ray",
                   help="ray: tokenize files in parallel with Ray Data (default); local: this process")
    p.add_argument("--suffix", action="append", help="only files with this suffix (repeatable), e.g. .txt")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.data import prepare, text_files

    tokenize = None
    if args.engine == "ray":
        from fax.cluster.data import tokenize_on_ray as tokenize
    suffixes = tuple(args.suffix) if args.suffix else None
    try:
        index = prepare(text_files(args.inputs, suffixes), args.out, args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, text_field=args.text_field, prompt_field=args.prompt_field,
                        messages_field=args.messages_field, invalid_utf8=args.invalid_utf8, tokenize=tokenize,
                        progress=True)
    except (ValueError, FileNotFoundError) as e:  # a record the options do not fit, a tokenizer that is not there...
        raise ConfigError(str(e)) from None
    skipped, replaced = index.get("files_without_text", 0), index.get("replaced_utf8", 0)
    print(f"wrote {index['num_tokens']:,} tokens from {index['num_documents']:,} documents to {args.out} "
          f"(validation: {index['val_tokens']:,} tokens, {index['val_documents']:,} documents; "
          f"tokenizer {index['tokenizer']}, {index['vocab_size']:,} tokens; {skipped:,} of {index['files']:,} files "
          f"without text, skipped; {replaced:,} undecodable byte sequences replaced with U+FFFD)")
    return 0
