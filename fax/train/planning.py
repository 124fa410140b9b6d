"""Planning on the present devices: the planner's ranked layouts compiled (and timed) with fax's
own train step until one fits. It sits beside the loop, not in ``fax.parallel``, because it
compiles the train step, which is built above the planner's layer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fax.checkpoint import abstract_like
from fax.config import Config, ConfigError, raise_problems, setting_problems, with_layout
from fax.data import Batch
from fax.parallel import make_mesh
from fax.parallel.cost import dcn_shares
from fax.parallel.hardware import ClusterSpec, cluster_preset
from fax.parallel.hlo import compiled_share
from fax.parallel.layout import Candidate
from fax.parallel.calibrate import present_cluster
from fax.parallel.planner import Plan, load_layout
from fax.parallel.planner import plan as plan_layouts
from fax.parallel.validation import validate as validate_plan
from fax.train import step as step_lib
from fax.train.aot import target_devices

PLAN_CANDIDATES = 50  # ranked layouts kept for compile validation


def read_layout(path: str) -> Candidate:
    try:
        return load_layout(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"plan={path!r} is not a readable plan ({e}); write one with `fax plan ... --json`") from None


def layout_compiler(config: Config, devices: list[jax.Device], slice_devices: int = 0) -> Callable[[Candidate], Any]:
    """Compiles ``config``'s train step under a layout, ahead of time (nothing allocated); over several
    slices of ``slice_devices``, the axes that span them as the planner laid them out."""
    def compile_layout(layout: Candidate) -> Any:
        cfg = with_layout(config, layout)
        if slice_devices:
            shares = dcn_shares(layout, slice_devices) or {}
            cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
                cfg.parallel, **{f"dcn_{axis}": n for axis, n in shares.items()}))
        training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
        state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
        return step_lib.compile_step(training, state, (cfg.train.batch_size, cfg.seq_len + 1))
    return compile_layout


def timed_steps(training: step_lib.ShardedTraining, cfg: Config, steps: int) -> tuple[step_lib.State, list[float]]:
    """Seconds of each of ``steps`` train steps from a fresh state on one batch of random tokens,
    after a warm-up step that compiles; and the state they leave."""
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.seq_len + 1))
    tokens = jax.device_put(Batch.of(tokens), training.batch_sharding)
    state, metrics = training.step(training.init(), tokens)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = training.step(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return state, times


def layout_timer(config: Config, devices: list[jax.Device], steps: int = 5) -> Callable[[Candidate], float]:
    """Seconds of the fastest of ``steps`` real train steps of ``config`` under a layout (after one
    warm-up step): the least disturbed by other work on a shared machine."""
    def time_layout(layout: Candidate) -> float:
        cfg = with_layout(config, layout)
        return min(timed_steps(step_lib.build(cfg, make_mesh(cfg.parallel, devices)), cfg, steps)[1])
    return time_layout


def plan_here(config: Config, devices: list[jax.Device], name: str = "", top: int = PLAN_CANDIDATES,
              validate: int = 1, measure: bool = False) -> Plan:
    """Plan ``config``'s model and batch for ``devices``, then compile the ranked layouts until ``validate``
    fit (timing each with ``measure``); raises ConfigError before any compile on bad settings."""
    raise_problems(setting_problems(config))  # the layout's own problems are the planner's to avoid
    cluster = present_cluster(devices)
    return _compiled_plan(config, cluster, devices, cluster.device.hbm_bytes, name, top, validate,
                          layout_timer(config, devices) if measure else None)


def laid_out(config: Config, devices: list[jax.Device], echo: Callable[[str], None]) -> tuple[Config, Plan | None]:
    """``config`` with the layout ``config.plan`` names: a plan file, or ``auto``: plan for these devices,
    compile the ranked layouts until one fits, take it (the plan is returned to be saved)."""
    if config.plan != "auto":
        return with_layout(config, read_layout(config.plan)), None
    result = plan_here(config, devices)
    best, compiled = result.best, result.validated[-1]
    echo(f"fax: plan=auto picked {best.candidate.describe()} of {result.searched} layouts on {result.cluster}: "
         f"predicted {best.step_s * 1e3:.1f} ms/step and {best.memory_bytes / 2 ** 20:.0f} MiB/device, "
         f"compiled {compiled.memory_bytes / 2 ** 20:.0f} MiB/device")
    return with_layout(config, best.candidate), result


def plan_for_slices(config: Config, cluster: str, name: str = "", validate: int = 1) -> Plan:
    """Plan ``config``'s model and batch for a TPU cluster preset that is not here, then compile the
    ranked layouts ahead of time for its real topology (XLA's TPU compiler, libtpu) until ``validate``
    fit: those XLA says do not fit are rejected and counted."""
    raise_problems(setting_problems(config))  # before libtpu starts
    devices, hbm_bytes, _ = target_devices(cluster)
    return _compiled_plan(config, cluster_preset(cluster), devices, hbm_bytes, name, PLAN_CANDIDATES, validate)


def _compiled_plan(config: Config, cluster: ClusterSpec, devices: list[Any], hbm_bytes: float, name: str, top: int,
                   validate: int, measure: Callable[[Candidate], float] | None = None) -> Plan:
    """The planner's ranking for ``cluster``, compiled on ``devices`` until ``validate`` layouts fit: the
    ranking admits the layouts predicted within what the compiler allows, which then decides."""
    try:
        result = plan_layouts(config.model, cluster, config.train.batch_size, config.seq_len, name, top=top,
                              memory_share=compiled_share(cluster.device.platform))
        compiler = layout_compiler(config, devices, cluster.slice_devices if cluster.slices > 1 else 0)
        return validate_plan(result, compiler, hbm_bytes, cluster.device.platform, k=validate, measure=measure)
    except ValueError as e:
        raise ConfigError(str(e)) from None
