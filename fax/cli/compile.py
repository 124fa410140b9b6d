"""``fax compile``: compile a config's train step for a TPU slice (or the present devices) without
training, and say whether it fits."""

from __future__ import annotations

import argparse

from fax.cli.options import add_config_options, compile_on_this_cpu

HELP = "compile the train step for a TPU slice (e.g. --cluster v5p-512) or the present devices; memory and collectives"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help=HELP,
                       description="Build the exact train step of the settings and compile it ahead of time: for a "
                                   "TPU slice that is not here (--cluster v5p-512, v4-1024, v5e-256, v5e-256x4 for "
                                   "4 slices; needs libtpu: pip install -e '.[tpu]') or for this machine's devices. "
                                   "Exits 1 when the step does not fit in the chip's memory.")
    add_config_options(p)
    p.add_argument("--cluster", default="", help="a TPU slice preset; default: the present devices")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.cluster:
        compile_on_this_cpu()
    from fax.config import load_config
    from fax.metrics import mesh_desc
    from fax.train.aot import compile_step, target_devices

    config = load_config(args.config, args.overrides)
    devices, hbm_bytes, target = target_devices(args.cluster)
    step = compile_step(config, devices, hbm_bytes, target)
    gib = 2 ** 30
    print(f"{target}: {step.devices} x {step.device_kind}, mesh {mesh_desc(step.mesh)}, "
          f"{config.train.batch_size} x {config.seq_len} tokens/step; compiled in {step.compile_s:.1f}s")
    if step.out_of_memory:
        print(f"DOES NOT FIT: {step.out_of_memory}")
        return 1
    print(f"memory per device: arguments {step.argument_bytes / gib:.2f} GiB, outputs {step.output_bytes / gib:.2f} GiB "
          f"(donated {step.alias_bytes / gib:.2f}), temporaries {step.temp_bytes / gib:.2f} GiB; "
          f"needed {step.needed_bytes / gib:.2f} of {step.hbm_bytes / gib:.0f} GiB "
          f"({'fits' if step.fits else 'DOES NOT FIT'})")
    print("collectives: " + (", ".join(f"{k} x{v}" for k, v in step.collectives.items()) or "none"))
    return 0 if step.fits else 1
