"""The ``fax`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence


def _cluster_settings(args: argparse.Namespace) -> list[str]:
    """The Ray-mode options as ``cluster.*`` settings (the ``key=value`` ones come after: they win)."""
    return [f"cluster.{key}={value}" for key, value in (
        ("ray", "true" if args.ray or args.emulate_hosts or args.address else None),
        ("address", args.address), ("emulate_hosts", args.emulate_hosts),
        ("devices_per_host", args.devices_per_host)) if value is not None]


def _train(args: argparse.Namespace) -> int:
    from fax.config import load_config
    from fax.trainer import PREEMPTED_EXIT_CODE, Preempted, Trainer

    config = load_config(args.config, [*_cluster_settings(args), *args.overrides])
    try:
        with Trainer(config) as trainer:
            trainer.fit()
    except Preempted as e:
        print(f"fax: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _open_checkpoints(run_dir: str):
    from fax.checkpoint import Checkpointer, checkpoint_dir
    from fax.config import run_config

    cfg = run_config(run_dir)
    return Checkpointer(checkpoint_dir(run_dir, cfg.checkpoint), cfg.checkpoint, read_only=True)


def _checkpoint_ls(args: argparse.Namespace) -> int:
    from fax.metrics import mesh_desc

    ckpt = _open_checkpoints(args.run_dir)
    print(f"{'step':>8}  {'size':>10}  {'loss':>8}  mesh")
    for step in ckpt.steps():
        meta = ckpt.meta(step)
        mesh = mesh_desc(meta["mesh"])
        loss = meta.get("metrics", {}).get("loss")
        print(f"{step:>8}  {ckpt.size_bytes(step) / 2**20:>8.1f}MB  {loss if loss is None else f'{loss:8.4f}'}  {mesh}")
    for name in ckpt.partial():
        print(f"{'partial':>8}  {name}  (an interrupted save; ignored on restore)")
    return 0


def _checkpoint_info(args: argparse.Namespace) -> int:
    from fax.metrics import mesh_desc

    ckpt = _open_checkpoints(args.run_dir)
    step = ckpt.complete_step(args.step, args.run_dir)
    meta = ckpt.meta(step)
    print(f"step {step}, {ckpt.size_bytes(step) / 2**20:.1f}MB, saved on {meta['devices']} {meta['device_kind']} "
          f"device(s), mesh {mesh_desc(meta['mesh'])}")
    print("metrics: " + json.dumps(meta.get("metrics")))
    import jax

    for path, (shape, dtype) in jax.tree_util.tree_leaves_with_path(
            ckpt.array_metadata(step), is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
            and isinstance(x[1], str)):
        print(f"  params{jax.tree_util.keystr(path):<40} {dtype:<8} {shape}")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.metrics import plot_runs, run_metrics, summary_table

    try:
        runs = {run_dir: run_metrics(run_dir) for run_dir in args.run_dirs}
        print(summary_table(runs))
        if args.plot:
            plot_runs(runs, args.plot)
            print(f"wrote {args.plot}")
    except (ImportError, ValueError) as e:  # no matplotlib; a log that is not one
        raise ConfigError(str(e)) from None
    return 0


def _eval(args: argparse.Namespace) -> int:
    import math

    from fax.trainer import evaluate_checkpoint

    step, loss = evaluate_checkpoint(args.run_dir, [*_cluster_settings(args), *args.overrides], args.step, args.split,
                                     echo=print)
    print(f"step {step}: {args.split} loss {loss:.4f}, perplexity {math.exp(loss):,.2f}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.data import prepare, text_files

    suffixes = tuple(args.suffix) if args.suffix else None
    try:
        index = prepare(text_files(args.inputs, suffixes), args.out, args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, text_field=args.text_field, prompt_field=args.prompt_field,
                        messages_field=args.messages_field, engine=args.engine, progress=True)
    except ValueError as e:  # a record the options do not fit, a tokenizer that is not there...
        raise ConfigError(str(e)) from None
    print(f"wrote {index['num_tokens']:,} tokens from {index['num_documents']:,} documents to {args.out} "
          f"(validation: {index['val_tokens']:,} tokens, {index['val_documents']:,} documents; "
          f"tokenizer {index['tokenizer']}, {index['vocab_size']:,} tokens)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fax import chat
    from fax.config import run_config
    from fax.serve import (Engine, SamplingParams, TextStream, generation_ends, request_problems, run_tokenizer,
                           stream)

    tokenizer = run_tokenizer(run_config(args.run_dir))
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
        from fax.config import ConfigError

        raise ConfigError("; ".join(problems))
    if not args.chat:  # the prompt, then its continuation (a chat: the reply alone)
        print(args.prompt, end="", flush=True)
    text = TextStream(tokenizer, sampling.stop)
    for (token,) in stream(engine, [prompt], [sampling]):
        if token is not None and not text.stopped:
            print(text.push(token), end="", flush=True)
    print(text.flush())
    return 0


def _serve(args: argparse.Namespace) -> int:
    import ray

    from fax.config import ClusterConfig, ServeConfig
    from fax.server import start, stop

    settings = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                           max_concurrent=args.max_concurrent, max_prompt_tokens=args.max_prompt_tokens,
                           max_tokens=args.max_tokens, model_name=args.model_name, warm_up=args.warm_up)
    cluster = ClusterConfig(ray=True, address=args.address, hosts=args.hosts, emulate_hosts=args.emulate_hosts,
                            devices_per_host=args.devices_per_host)
    owns_ray = not ray.is_initialized()
    try:
        start(args.run_dir, settings, cluster, args.cpu_devices)
        print("fax: Ctrl-C (or SIGTERM) stops the server", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        if ray.is_initialized():
            stop(owns_ray)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from fax.config import ConfigError, load_config, preset_or_error
    from parallel.hardware import cluster_preset, present_cluster
    from parallel.planner import plan

    if args.calibrate:
        import jax

        from parallel.calibrate import calibrate

        profile = calibrate(jax.devices())
        link = (f"; all-reduce over {profile['devices']} devices: {profile['link_bandwidth'] / 1e9:.2f} GB/s, "
                f"{profile['link_latency'] * 1e6:.0f} us per step" if "link_bandwidth" in profile else "")
        print(f"calibrated {profile['device_kind']}: best matmul {profile['best_matmul_flops'] / 1e9:.1f} GFLOP/s"
              f"{link}; saved {profile['path']}")
    try:
        cluster = cluster_preset(args.cluster) if args.cluster else present_cluster()
        if cluster.present:  # compiled (and with --measure timed) on these devices
            import jax

            from fax.trainer import plan_here

            config = load_config(overrides=[f"model={args.model}", f"model.dtype={args.dtype}",
                                            f"train.batch_size={args.global_batch}", f"train.seq_len={args.seq}"])
            result = plan_here(config, jax.devices(), args.model, validate=args.validate, measure=args.measure)
        else:
            model = preset_or_error(args.model).replace(dtype=args.dtype)
            result = plan(model, cluster, args.global_batch, args.seq, args.model, args.top)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(result.to_json())
        return 0
    d = cluster.device
    print(f"{args.model} on {cluster.name}: {cluster.hosts} host(s) x {cluster.devices_per_host} {d.name} "
          f"({d.peak_flops / 1e12:.3g} TFLOP/s, {d.hbm_bytes / 2 ** 30:.0f} GiB), batch {args.global_batch} x "
          f"{args.seq} tokens; {result.searched} layouts in {result.seconds:.2f} s"
          + ("" if cluster.present else " (analytical: this cluster is not present)"))
    print(f"{'#':>3}  {'layout':<52}{'step s':>9}{'tokens/s':>12}{'MFU':>6}{'GiB/dev':>9}{'comm':>6}")
    for i, e in enumerate(result.ranked[:args.top], 1):
        print(f"{i:>3}  {e.candidate.describe():<52}{e.step_s:>9.3f}{e.tokens_per_s:>12,.0f}{e.mfu:>6.2f}"
              f"{e.memory_bytes / 2 ** 30:>9.1f}{e.comm_share:>6.0%}")
    print("templates:")
    for name, e in result.templates.items():
        told = e if isinstance(e, str) else (f"{e.candidate.describe()}: {e.step_s:.3f} s/step, MFU {e.mfu:.2f}, "
                                            f"pick is {e.step_s / result.best.step_s:.2f}x faster")
        print(f"  {name:<12} {told}")
    if result.validated:
        print("compiled on the present devices (predicted vs what XLA reports per device):")
        print(f"     {'layout':<52}{'pred ms':>9}{'pred MiB':>10}{'XLA MiB':>9}{'fits':>6}{'meas ms':>9}  collectives")
        for c in result.validated:
            measured = f"{c.measured_s * 1e3:>9.1f}" if c.measured_s is not None else f"{'-':>9}"
            ops = ", ".join(f"{k} {v}" for k, v in c.collectives.items()) or "none"
            print(f"     {c.layout:<52}{c.predicted_s * 1e3:>9.1f}{c.predicted_memory_bytes / 2 ** 20:>10.1f}"
                  f"{c.memory_bytes / 2 ** 20:>9.1f}{'yes' if c.fits else 'NO':>6}{measured}  {ops}")
        print(f"pick: {result.best.candidate.describe()}")
    print("rejected:")
    for reason, count in result.rejected.items():
        print(f"  {count:>6} {reason}, e.g. {result.examples[reason]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.hf import export_adapters, export_run

    try:
        out, step = (export_adapters if args.adapters_only else export_run)(args.run_dir, args.out, args.step)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    what = "LoRA adapters" if args.adapters_only else "Hugging Face model (adapters merged)"
    print(f"fax: wrote the checkpoint of step {step} of {args.run_dir} as a {what} to {out}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.infer import InferSettings, infer

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


def _presets(args: argparse.Namespace) -> int:
    import models

    print(f"{'preset':<14}{'params':>12}{'layers':>8}{'d_model':>9}{'heads':>7}{'kv':>5}{'context':>9}")
    for name in models.preset_names():
        m = models.preset(name)
        print(f"{name:<14}{models.param_count(m) / 1e6:>11,.1f}M{m.n_layers:>8}{m.d_model:>9}{m.n_heads:>7}"
              f"{m.n_kv_heads:>5}{m.max_seq_len:>9}")
    return 0


def _ray_options(command: argparse.ArgumentParser) -> None:
    ray_mode = command.add_argument_group("Ray mode (one worker per host; see the README)")
    ray_mode.add_argument("--ray", action="store_true", help="run on a Ray cluster (cluster.ray=true)")
    ray_mode.add_argument("--address", help="the Ray cluster to join, e.g. auto (cluster.address); "
                                            "default: start a local one")
    ray_mode.add_argument("--emulate-hosts", type=int, metavar="N",
                          help="a local cluster of N emulated CPU hosts (cluster.emulate_hosts)")
    ray_mode.add_argument("--devices-per-host", type=int, metavar="K",
                          help="emulated CPU devices per host (cluster.devices_per_host, default 4)")


def _penalty_options(command: argparse.ArgumentParser) -> None:
    """OpenAI's repetition penalties, as the HTTP API takes them."""
    command.add_argument("--frequency-penalty", type=float, default=0.0,
                         help="lower a token's logit by this times its count in the text generated so far ([-2, 2])")
    command.add_argument("--presence-penalty", type=float, default=0.0,
                         help="lower a token's logit by this once it was generated ([-2, 2])")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fax", description="Train and serve language models with JAX.")
    p.add_argument("--cpu-devices", type=int,
                   help="devices to emulate on the CPU when there is no accelerator (default: 8, and 1 for "
                        "generate and serve)")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (defaults: a small GPT on the Python standard library)",
                           description="Train. Settings are key.sub=value overrides, e.g. "
                                       "`fax train model=llama-tiny train.steps=30 run_dir=runs/a`.")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.add_argument("--config", help="a YAML file of settings, applied before the overrides")
    _ray_options(train)
    train.set_defaults(run=_train)

    prep = sub.add_parser("prepare", help="tokenize text, JSONL and Parquet files into the dataset format `data.path` reads")
    prep.add_argument("inputs", nargs="+", help="files or folders (walked recursively)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--tokenizer", default="byte", help="byte, bpe (trained here on the inputs), or the path of "
                                                          "a tokenizer.json (e.g. one shipped with a HF checkpoint)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="tokens of a bpe tokenizer")
    prep.add_argument("--val-fraction", type=float, default=0.0, help="share of documents kept for validation")
    prep.add_argument("--text-field", default="text", help="the text of a JSONL record / Parquet row")
    prep.add_argument("--prompt-field", default="", help="a record's prompt: read by the model before its text, "
                                                         "not trained on (instruction tuning); default: none")
    prep.add_argument("--messages-field", default="", help="a record's conversation, a list of {role, content} "
                                                           "messages: only the assistant's are trained on (chat "
                                                           "tuning, served by /v1/chat/completions); default: none")
    prep.add_argument("--engine", choices=("ray", "local"), default="ray",
                      help="ray: tokenize files in parallel with Ray Data (default); local: this process")
    prep.add_argument("--suffix", action="append", help="only files with this suffix (repeatable), e.g. .txt")
    prep.set_defaults(run=_prepare)

    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face GPT-2/Llama directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    export.add_argument("--step", type=int, help="default: the latest complete checkpoint")
    export.add_argument("--adapters-only", action="store_true", help="a LoRA run's adapters alone (safetensors)")
    export.set_defaults(run=_export)

    inf = sub.add_parser("infer", help="complete every prompt (or reply to every conversation) of a JSONL/Parquet "
                                       "file (Ray Data, resumable)")
    inf.add_argument("run_dir")
    inf.add_argument("--input", required=True, help="a .jsonl or .parquet file of prompts")
    inf.add_argument("--output", required=True, help="a .jsonl or .parquet file (parts kept in OUTPUT.parts/)")
    inf.add_argument("--field", default="prompt", help="the prompt's field or column")
    inf.add_argument("--messages-field", default="",
                     help="instead of a prompt, the field of a conversation ({role, content} messages) to reply "
                          "to, laid out as in chat tuning (fax prepare --messages-field)")
    inf.add_argument("--max-tokens", type=int, default=64)
    inf.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    inf.add_argument("--top-k", type=int, default=0)
    inf.add_argument("--top-p", type=float, default=1.0)
    inf.add_argument("--seed", type=int, default=0, help="row i samples with seed + i")
    inf.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    _penalty_options(inf)
    inf.add_argument("--max-batch", type=int, default=16, help="prompts one engine decodes together")
    inf.add_argument("--workers", type=int, default=1, help="engines (Ray actors) working in parallel")
    inf.add_argument("--engine", choices=("ray", "local"), default="ray")
    inf.set_defaults(run=_infer)

    ckpt = sub.add_parser("checkpoint", help="inspect a run's checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    ls = ckpt_sub.add_parser("ls", help="steps, sizes, losses and meshes of the complete checkpoints")
    ls.add_argument("run_dir")
    ls.set_defaults(run=_checkpoint_ls)
    info = ckpt_sub.add_parser("info", help="one checkpoint: mesh, metrics, parameter shapes and dtypes")
    info.add_argument("run_dir")
    info.add_argument("step", nargs="?", type=int, help="default: the latest")
    info.set_defaults(run=_checkpoint_info)

    ev = sub.add_parser("eval", help="a checkpoint's loss and perplexity on a dataset split (by default the "
                                     "run's own val_loss)")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="settings to change: data.path, train.eval_batches, train.batch_size, train.seq_len, "
                         "parallel.* (the mesh: any that fits the devices), cluster.* (Ray mode)")
    ev.add_argument("--step", type=int, help="the checkpoint (default: the latest complete one)")
    ev.add_argument("--split", choices=("val", "train"), default="val")
    _ray_options(ev)
    ev.set_defaults(run=_eval)

    met = sub.add_parser("metrics", help="compare runs' logged metrics: loss, val_loss, tokens/s, MFU; --plot "
                                         "draws their curves")
    met.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    met.add_argument("--plot", metavar="FILE", help="write loss, tokens/s, MFU and lr against the step, a line per "
                                                    "run (.png, .svg or .pdf; needs the plot extra)")
    met.set_defaults(run=_metrics)

    gen = sub.add_parser("generate", help="continue a prompt with a trained run's model (KV cache, streamed)")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="the prompt is a user's message to a chat-tuned run "
                                                         "(fax prepare --messages-field): print the reply")
    gen.add_argument("--max-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no limit")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    _penalty_options(gen)
    gen.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    gen.set_defaults(run=_generate)

    srv = sub.add_parser("serve", help="serve a trained run over HTTP: /v1/completions (streaming), /v1/models, "
                                       "/health, on Ray Serve with continuous batching")
    srv.add_argument("run_dir")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    srv.add_argument("--max-concurrent", type=int, default=64,
                     help="requests running, queued or being scored; more get 429")
    srv.add_argument("--max-prompt-tokens", type=int, default=0, help="0: the model's context")
    srv.add_argument("--max-tokens", type=int, default=0, help="the most a request may ask for; 0: the context")
    srv.add_argument("--model-name", default="", help="the id in /v1/models (default: the run directory's name)")
    srv.add_argument("--warm-up", action="store_true",
                     help="compile every prefill and decode shape before serving, so that no request waits for "
                          "a compile (on 2 CPU cores ~90 s for the default model, a max batch of 16)")
    srv.add_argument("--address", default="", help="join this Ray cluster ('auto': the running one)")
    srv.add_argument("--hosts", type=int, default=0, help="hosts the engine spans (default 1, or every emulated host)")
    srv.add_argument("--emulate-hosts", type=int, default=0, help="a local cluster of N emulated CPU hosts")
    srv.add_argument("--devices-per-host", type=int, default=4, help="emulated CPU devices per emulated host")
    srv.set_defaults(run=_serve)

    pl = sub.add_parser("plan", help="search pipeline x sharding x microbatch x remat layouts; rank, explain")
    pl.add_argument("--model", default="gpt-mini", help="a model preset (fax presets)")
    pl.add_argument("--cluster", default="", help="a cluster preset, e.g. v4-1024, h100-1024, cpu-8 "
                                                  "(default: this machine's devices)")
    pl.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    pl.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    pl.add_argument("--dtype", default="bfloat16", help="the compute dtype planned for (model.dtype)")
    pl.add_argument("--top", type=int, default=10, help="how many ranked layouts to print")
    pl.add_argument("--json", action="store_true", help="the whole plan as JSON")
    pl.add_argument("--validate", type=int, default=3, help="present devices: compile ranked layouts until this "
                                                            "many fit; the pick is the first (or fastest measured)")
    pl.add_argument("--calibrate", action="store_true", help="measure this machine's matmul rate and collective "
                                                              "bandwidth first; later plans here use the profile")
    pl.add_argument("--measure", action="store_true", help="present devices: also time real steps of those")
    pl.set_defaults(run=_plan)

    presets = sub.add_parser("presets", help="list the named model shapes")
    presets.set_defaults(run=_presets)
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``key=value`` settings may come after options too (``fax train --ray
    train.steps=5``), where argparse alone takes only those before the first option."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


INTERRUPTED_EXIT_CODE = 130  # the shell's code for a command ended by Ctrl-C


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (how job schedulers and service managers stop a process) unwinds like Ctrl-C, so
    every command's cleanup runs: Ray and its workers shut down, a server stops. Python's default
    ends the process on the spot and leaves Ray's processes behind. (Training takes both signals
    over while it runs, to save a checkpoint first.) A repeated SIGTERM is ignored from then on: it
    would cut that cleanup short (``timeout`` and a signal to the process group each send one);
    Ctrl-C still does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def cpu_devices(command: str, asked: int | None) -> int:
    """How many devices to emulate on the CPU: 8 by default, a mesh to train and evaluate over; 1 to
    generate and serve. Emulated devices share the same cores, so an engine split over them does the
    same work plus collectives (a quarter of one device's tokens/s at batch 1), and even an engine on
    one of 8 runs 30% slower at batch 16 than in a process of one device."""
    if asked is not None:
        return asked
    return 1 if command in ("generate", "serve") else 8


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    import jax

    explicit, args.cpu_devices = args.cpu_devices is not None, cpu_devices(args.command, args.cpu_devices)
    try:  # only the CPU backend reads this: with no accelerator, the CPU is split into emulated devices
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    except RuntimeError:  # JAX had started in this process already (main called from Python): its devices stand
        if explicit:
            raise
    from fax.chat import TemplateError
    from fax.config import ConfigError
    from fax.signals import handling

    try:
        with handling(_interrupt, signal.SIGTERM):
            return args.run(args)
    except (ConfigError, FileNotFoundError, TemplateError) as e:
        print(f"fax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fax: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
