"""Train steps of several configurations timed side by side: each built, compiled and run once, then
timed in alternating rounds, so that the machine's noise falls on all of them alike."""

from __future__ import annotations

import time
from typing import Any

import jax


def prepared(cfg: Any, tokens: Any) -> dict[str, Any]:
    """``cfg``'s train step on its mesh of the present devices, compiled, with its fresh params, the batch
    ``tokens`` laid out for it, the first step's metrics and XLA's scratch memory per device."""
    from fax.checkpoint import abstract_like
    from fax.parallel import make_mesh
    from fax.train import step as step_lib

    training = step_lib.build(cfg, make_mesh(cfg.parallel))
    state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
    memory = step_lib.compile_step(training, state, tokens.tokens.shape).memory_analysis()
    batch = jax.device_put(tokens, training.batch_sharding)
    params = training.init()
    _, metrics = training.step(jax.tree.map(lambda x: x.copy(), params), batch)  # compiles; the first loss
    return {"training": training, "params": params, "batch": batch, "metrics": metrics,
            "loss": float(metrics["loss"]), "temp_bytes": memory.temp_size_in_bytes, "times": []}


def time_alternating(runs: dict[str, dict[str, Any]], rounds: int, steps: int) -> None:
    """Append to each run's ``times`` the seconds per step of ``steps`` steps from its fresh params, one
    round of every run after another."""
    for _ in range(rounds):
        for run in runs.values():
            state = jax.tree.map(lambda x: x.copy(), run["params"])
            started = time.perf_counter()
            for _ in range(steps):
                state, metrics = run["training"].step(state, run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append((time.perf_counter() - started) / steps)
