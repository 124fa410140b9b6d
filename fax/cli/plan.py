"""``fax plan``: search pipeline x sharding x microbatch x remat layouts for a model and cluster; rank,
explain; or judge one given layout (``--layout``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from fax.cli.options import add_config_options, compile_on_this_cpu

if TYPE_CHECKING:
    from fax.config import Config

HELP = "search pipeline x sharding x microbatch x remat layouts; rank, explain (or judge one: --layout)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help=HELP, description=(
        "Plan the settings `fax train` takes (model=PRESET or model=hf:DIR, model.* fields, train.batch_size, "
        "train.seq_len) for a cluster: e.g. `fax plan model=llama3-70b train.batch_size=1024 train.seq_len=8192 "
        "--cluster v5p-512`."))
    add_config_options(p)
    p.add_argument("--model", help="a model preset (fax presets) or hf:DIR; the same as model=...")
    p.add_argument("--cluster", default="", help="a cluster preset <family>-<count>[x<slices>]: v4-1024, v5e-256, "
                                                 "v5p-512x4, v6e-256, a100-64, h100-1024, h200-64, cpu-8 (default: "
                                                 "this machine's devices)")
    p.add_argument("--global-batch", type=int, help="sequences per step (train.batch_size)")
    p.add_argument("--seq", type=int, help="tokens per sequence (train.seq_len; default the model's context)")
    p.add_argument("--dtype", default="bfloat16", help="the compute dtype planned for (model.dtype)")
    p.add_argument("--layout", help="judge this one layout instead of searching: a plan file, or its JSON inline, "
                                    "e.g. '{\"fsdp\": 64, \"tensor\": 4, \"remat\": \"full\"}'")
    p.add_argument("--top", type=int, default=10, help="how many ranked layouts to print")
    p.add_argument("--json", action="store_true", help="the whole plan (or the judged layout) as JSON")
    p.add_argument("--validate", type=int, help="compile ranked layouts until this many fit and reject those XLA "
                                                "says do not: on the present devices (default 3), or for a TPU "
                                                "cluster preset ahead of time (libtpu; default 0)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's matmul rate and collective "
                                                             "bandwidth first; later plans here use the profile")
    p.add_argument("--measure", action="store_true", help="present devices: also time real steps of those")
    # analytical plans for a cluster preset need no jax (nor its start-up time)
    p.set_defaults(run=run, without_jax=lambda args: bool(args.cluster) and not args.validate)


def planned_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The settings planned, and the model's name: the flags, then the YAML file and ``key=value``
    overrides (which win); ``model=hf:DIR`` is a Hugging Face checkpoint's config, its ``model.*``
    overrides on top."""
    from fax.config import apply_overrides, load_config
    from fax.interop.hf_config import hf_folder, model_config, read_config

    flags = [f"{key}={value}" for key, value in (("model", args.model), ("train.batch_size", args.global_batch),
                                                 ("train.seq_len", args.seq)) if value is not None]
    overrides = [*flags, f"model.dtype={args.dtype}", *args.overrides]
    models = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    name = models[-1] if models else "gpt-mini"
    folder = hf_folder(name)
    if folder is None:
        return load_config(args.config, overrides), name
    fields = [o for o in overrides if o.startswith("model.")]
    config = load_config(args.config, [o for o in overrides if not o.startswith("model")])
    return apply_overrides(dataclasses.replace(config, model=model_config(read_config(folder))), fields), name


def run(args: argparse.Namespace) -> int:
    from fax.config import ConfigError
    from fax.parallel.hardware import cluster_preset

    config, name = planned_config(args)
    try:
        cluster = cluster_preset(args.cluster) if args.cluster else None
        if cluster is not None and cluster.device.platform == "tpu" and args.validate:
            compile_on_this_cpu()
        if cluster is None:
            from fax.parallel.calibrate import present_cluster

            if args.calibrate:
                calibrate_here()
            cluster = present_cluster()
        if args.layout:
            return judge(config, cluster, args)
        result = search(config, cluster, name, args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(result.to_json())
        return 0
    report(result, cluster, config, args.top, args.validate)
    return 0


def calibrate_here() -> None:
    import jax

    from fax.parallel.calibrate import calibrate

    profile = calibrate(jax.devices())
    link = (f"; all-reduce over {profile['devices']} devices: {profile['link_bandwidth'] / 1e9:.2f} GB/s, "
            f"{profile['link_latency'] * 1e6:.0f} us per step" if "link_bandwidth" in profile else "")
    print(f"calibrated {profile['device_kind']}: best matmul {profile['best_matmul_flops'] / 1e9:.1f} GFLOP/s, "
          f"{profile['matmul_ceiling']:.2f} of nominal peak{link}; saved {profile['path']}")


def search(config, cluster, name: str, args: argparse.Namespace):
    """Plan analytically for a cluster preset (compiled ahead of time for a TPU one with --validate),
    or for the present devices, compiled (and with --measure timed) on them."""
    if cluster.present:
        import jax

        from fax.train.planning import plan_here

        return plan_here(config, jax.devices(), name, validate=3 if args.validate is None else args.validate,
                         measure=args.measure)
    if args.validate and cluster.device.platform == "tpu":
        from fax.train.planning import plan_for_slices

        return plan_for_slices(config, args.cluster, name, args.validate)
    from fax.parallel.planner import plan

    return plan(config.model, cluster, config.train.batch_size, config.seq_len, name, args.top)


def judge(config, cluster, args: argparse.Namespace) -> int:
    """One given layout's prediction: step time, tokens/s, MFU, its breakdown, memory by kind, and
    whether it fits (or why not). Exits 1 when it cannot run or does not fit."""
    import json
    import math

    from fax.parallel.hlo import fits_device
    from fax.parallel.memory import MEMORY_HEADROOM
    from fax.parallel.planner import fitted, load_layout, problems, workload

    try:
        layout = load_layout(args.layout)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--layout {args.layout!r} is not a readable layout ({e}); write one with "
                         "`fax plan ... --json` or as JSON of the layout's fields") from None
    w = workload(config.model, cluster, config.train.batch_size, config.seq_len)
    found = [message for _, message in problems(layout, w)]
    if math.prod(layout.axes.values()) != cluster.devices:
        found.insert(0, f"its mesh has {math.prod(layout.axes.values())} devices, the cluster {cluster.devices}")
    e = fitted(layout, w, cluster)
    budget = MEMORY_HEADROOM * cluster.device.hbm_bytes
    # memory its only problem, past the margin for the prediction's error but within what the compiler
    # allows: compiling decides
    tight = not found and not e.fits and fits_device(e.memory_bytes, cluster.device.hbm_bytes,
                                                     cluster.device.platform)
    if not found and not e.fits:
        found.append(f"needs {e.memory_bytes / 2 ** 30:.1f} GiB per device, above {budget / 2 ** 30:.1f} GiB "
                     f"({MEMORY_HEADROOM:.0%} of {cluster.device.hbm_bytes / 2 ** 30:.0f} GiB, the margin for the "
                     "prediction's error)" + ("; within the device: compiling it decides (`fax compile`)"
                                              if tight else ""))
    if args.json:
        print(json.dumps({"cluster": cluster.name, "layout": e.to_dict(), "breakdown": e.breakdown(),
                          "fits": not found, "within_device": not found or tight, "problems": found}, indent=2))
        return 0 if not found else 1
    print(f"{e.candidate.describe()} on {cluster.name}, batch {config.train.batch_size} x {config.seq_len}: "
          f"{e.step_s:.3f} s/step, {e.tokens_per_s:,.0f} tokens/s, MFU {e.mfu:.2f}")
    print_breakdown(e)
    print("fits" if not found else ("MAY NOT FIT: " if tight else "DOES NOT RUN: ") + "; ".join(found))
    return 0 if not found else 1


def print_breakdown(e) -> None:
    steps = ", ".join(f"{k} {v:.3g} s ({v / e.step_s:.0%})" for k, v in e.breakdown().items() if v)
    memory = ", ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in e.memory.items())
    print(f"  step: {steps}")
    print(f"  memory per device (GiB): {memory}; total {e.memory_bytes / 2 ** 30:.2f}")


def report(result, cluster, config, top: int, validate: int | None) -> None:
    d = cluster.device
    slices = f" x {cluster.slices} slices" if cluster.slices > 1 else ""
    print(f"{result.model} on {cluster.name}: {cluster.hosts} host(s) x {cluster.devices_per_host} {d.name}{slices} "
          f"({d.peak_flops / 1e12:.3g} TFLOP/s, {d.hbm_bytes / 2 ** 30:.0f} GiB), batch {result.global_batch} x "
          f"{result.seq_len} tokens; {result.searched} layouts in {result.seconds:.2f} s"
          + ("" if cluster.present else " (analytical: this cluster is not present)"))
    print(f"{'#':>3}  {'layout':<56}{'step s':>9}{'tokens/s':>12}{'MFU':>6}{'GiB/dev':>9}{'comm':>6}")
    for i, e in enumerate(result.ranked[:top], 1):
        print(f"{i:>3}  {e.candidate.describe():<56}{e.step_s:>9.3f}{e.tokens_per_s:>12,.0f}{e.mfu:>6.2f}"
              f"{e.memory_bytes / 2 ** 30:>9.1f}{e.comm_share:>6.0%}")
    print(f"pick: {result.best.candidate.describe()}")
    print_breakdown(result.best)
    print("nearest alternatives:")
    for e, why in result.alternatives:
        print(f"  {e.candidate.describe()}: {why}")
    print("templates:")
    for name, e in result.templates.items():
        told = e if isinstance(e, str) else (f"{e.candidate.describe()}: {e.step_s:.3f} s/step, MFU {e.mfu:.2f}, "
                                            f"pick is {e.step_s / result.best.step_s:.2f}x faster")
        print(f"  {name:<12} {told}")
    if result.validated:
        where = "the present devices" if cluster.present else f"{cluster.name} (TPU, ahead of time)"
        print(f"compiled for {where} (predicted vs what XLA reports per device):")
        print(f"     {'layout':<56}{'pred ms':>9}{'pred GiB':>10}{'XLA GiB':>9}{'fits':>6}{'meas ms':>9}  collectives")
        for c in result.validated:
            measured = f"{c.measured_s * 1e3:>9.1f}" if c.measured_s is not None else f"{'-':>9}"
            ops = ", ".join(f"{k} {v}" for k, v in c.collectives.items()) or "none"
            print(f"     {c.layout:<56}{c.predicted_s * 1e3:>9.1f}{c.predicted_memory_bytes / 2 ** 30:>10.2f}"
                  f"{c.memory_bytes / 2 ** 30:>9.2f}{'yes' if c.fits else 'NO':>6}{measured}  {ops}")
    elif validate and d.platform != "tpu":
        print(f"not compiled: no ahead-of-time compiler for {d.name} here (TPU slices only); memory is the cost "
              "model's: compile on such devices with `fax plan` there, or `fax compile`")
    print("rejected:")
    for reason, count in result.rejected.items():
        print(f"  {count:>6} {reason}, e.g. {result.examples[reason]}")
