"""``fax plan``: search pipeline x sharding x microbatch x remat layouts for a model and cluster; rank, explain."""

from __future__ import annotations

import argparse

HELP = "search pipeline x sharding x microbatch x remat layouts; rank, explain"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help=HELP)
    p.add_argument("--model", default="gpt-mini", help="a model preset (fax presets), or hf:DIR (a Hugging Face "
                                                        "checkpoint's config.json)")
    p.add_argument("--cluster", default="", help="a cluster preset, e.g. v4-1024, h100-1024, cpu-8 "
                                                 "(default: this machine's devices)")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--dtype", default="bfloat16", help="the compute dtype planned for (model.dtype)")
    p.add_argument("--top", type=int, default=10, help="how many ranked layouts to print")
    p.add_argument("--json", action="store_true", help="the whole plan as JSON")
    p.add_argument("--validate", type=int, default=3, help="present devices: compile ranked layouts until this "
                                                           "many fit; the pick is the first (or fastest measured)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's matmul rate and collective "
                                                             "bandwidth first; later plans here use the profile")
    p.add_argument("--measure", action="store_true", help="present devices: also time real steps of those")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from fax.config import ConfigError, load_config, preset_or_error
    from fax.interop.hf import model_config, read_config
    from fax.interop.sources import hf_folder
    from fax.parallel.calibrate import present_cluster
    from fax.parallel.hardware import cluster_preset
    from fax.parallel.planner import plan

    if args.calibrate:
        import jax

        from fax.parallel.calibrate import calibrate

        profile = calibrate(jax.devices())
        link = (f"; all-reduce over {profile['devices']} devices: {profile['link_bandwidth'] / 1e9:.2f} GB/s, "
                f"{profile['link_latency'] * 1e6:.0f} us per step" if "link_bandwidth" in profile else "")
        print(f"calibrated {profile['device_kind']}: best matmul {profile['best_matmul_flops'] / 1e9:.1f} GFLOP/s"
              f"{link}; saved {profile['path']}")
    try:
        cluster = cluster_preset(args.cluster) if args.cluster else present_cluster()
        folder = hf_folder(args.model)
        model = (model_config(read_config(folder)) if folder else preset_or_error(args.model)).replace(dtype=args.dtype)
        if cluster.present:  # compiled (and with --measure timed) on these devices
            import jax

            from fax.train.planning import plan_here

            config = load_config(overrides=[f"train.batch_size={args.global_batch}", f"train.seq_len={args.seq}"])
            config = dataclasses.replace(config, model=model)
            result = plan_here(config, jax.devices(), args.model, validate=args.validate, measure=args.measure)
        else:
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
