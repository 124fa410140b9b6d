"""``fax serve``: an OpenAI-compatible HTTP server over a run's model, on Ray Serve."""

from __future__ import annotations

import argparse
import threading

HELP = "serve a trained run over HTTP: /v1/completions (streaming), /v1/models, /health, on Ray Serve with " \
       "continuous batching"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP)
    p.add_argument("run_dir", help="a run directory, or hf:DIR (a Hugging Face folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="requests running, queued or being scored; more get 429")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="0: the model's context")
    p.add_argument("--max-tokens", type=int, default=0, help="the most a request may ask for; 0: the context")
    p.add_argument("--model-name", default="", help="the id in /v1/models (default: the run directory's name)")
    p.add_argument("--warm-up", action="store_true",
                   help="compile every prefill and decode shape before serving, so that no request waits for "
                        "a compile (minutes on a few CPU cores)")
    p.add_argument("--max-request-bytes", type=int, default=8_388_608, help="larger request bodies get 413")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive; slower ones get 408")
    p.add_argument("--address", default="", help="join this Ray cluster ('auto': the running one)")
    p.add_argument("--hosts", type=int, default=0, help="hosts the engine spans (default 1, or every emulated host)")
    p.add_argument("--emulate-hosts", type=int, default=0, help="a local cluster of N emulated CPU hosts")
    p.add_argument("--devices-per-host", type=int, default=4, help="emulated CPU devices per emulated host")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from fax.config import ClusterConfig, ServeConfig
    from fax.serving.http import start, stop

    settings = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                           max_concurrent=args.max_concurrent, max_prompt_tokens=args.max_prompt_tokens,
                           max_tokens=args.max_tokens, model_name=args.model_name, warm_up=args.warm_up,
                           max_request_bytes=args.max_request_bytes, read_timeout_s=args.read_timeout)
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
