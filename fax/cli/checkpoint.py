"""``fax checkpoint ls|info|verify``: inspect a run's checkpoints."""

from __future__ import annotations

import argparse
import json

HELP = "inspect a run's checkpoints"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help=HELP)
    commands = p.add_subparsers(dest="checkpoint_command", required=True)
    ls = commands.add_parser("ls", help="steps, sizes, losses and meshes of the complete checkpoints")
    ls.add_argument("run_dir")
    ls.set_defaults(run=list_steps)
    info = commands.add_parser("info", help="one checkpoint: mesh, metrics, parameter shapes and dtypes")
    info.add_argument("run_dir")
    info.add_argument("step", nargs="?", type=int, help="default: the latest")
    info.set_defaults(run=describe)
    verify = commands.add_parser("verify", help="read every array of checkpoints back and check their checksums "
                                                "(exit 1 if any is damaged)")
    verify.add_argument("run_dir")
    verify.add_argument("step", nargs="?", type=int, help="default: every complete checkpoint")
    verify.set_defaults(run=verify_steps)


def _open(run_dir: str):
    from fax.checkpoint import Checkpointer, checkpoint_dir
    from fax.config import run_config

    cfg = run_config(run_dir)
    return Checkpointer(checkpoint_dir(run_dir, cfg.checkpoint), cfg.checkpoint, read_only=True)


def list_steps(args: argparse.Namespace) -> int:
    from fax.checkpoint import CheckpointDamaged
    from fax.metrics import mesh_desc

    ckpt = _open(args.run_dir)
    print(f"{'step':>8}  {'size':>10}  {'loss':>8}  mesh")
    for step in ckpt.steps():
        try:
            meta = ckpt.meta(step)
        except CheckpointDamaged as e:
            print(f"{step:>8}  {ckpt.size_bytes(step) / 2**20:>8.1f}MB  {'DAMAGED':>8}  {e.reason}")
            continue
        loss = meta.get("metrics", {}).get("loss")
        print(f"{step:>8}  {ckpt.size_bytes(step) / 2**20:>8.1f}MB  {loss if loss is None else f'{loss:8.4f}'}  "
              f"{mesh_desc(meta.get('mesh', {}))}")
    for name in ckpt.partial():
        print(f"{'partial':>8}  {name}  (an interrupted save; ignored on restore)")
    return 0


def verify_steps(args: argparse.Namespace) -> int:
    from fax.checkpoint import CheckpointDamaged

    ckpt = _open(args.run_dir)
    steps = [ckpt.complete_step(args.step, args.run_dir)] if args.step is not None else ckpt.steps()
    damaged = 0
    for step in steps:
        try:
            ckpt.verify(step)
            print(f"step {step}: intact")
        except CheckpointDamaged as e:
            damaged += 1
            print(f"step {step}: DAMAGED: {e.reason}")
    print(f"{len(steps) - damaged} of {len(steps)} checkpoints intact")
    return 1 if damaged else 0


def describe(args: argparse.Namespace) -> int:
    import jax

    from fax.metrics import mesh_desc

    ckpt = _open(args.run_dir)
    step = ckpt.complete_step(args.step, args.run_dir)
    meta = ckpt.meta(step)
    print(f"step {step}, {ckpt.size_bytes(step) / 2**20:.1f}MB, saved on {meta['devices']} {meta['device_kind']} "
          f"device(s), mesh {mesh_desc(meta['mesh'])}")
    print("metrics: " + json.dumps(meta.get("metrics")))
    for path, (shape, dtype) in jax.tree_util.tree_leaves_with_path(
            ckpt.array_metadata(step), is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
            and isinstance(x[1], str)):
        print(f"  params{jax.tree_util.keystr(path):<40} {dtype:<8} {shape}")
    return 0
