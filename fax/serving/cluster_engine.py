"""A serving engine over the host workers of a Ray cluster: one global mesh, for models that need
more than one host. The engine calls a ``Batcher`` makes are made on every host; the tokens are
replicated, so worker 0's answer is everyone's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fax.cluster.hosts import HostGroup
from fax.serving.engine import Engine


def engine_host(run_dir: str, step: int | None, max_batch: int) -> tuple[Engine, dict[str, Any]]:
    """This host's share of an engine over the global mesh, params restored onto it (``HostWorker.load``)."""
    engine = Engine.from_run_dir(run_dir, step=step, max_batch=max_batch)
    return engine, {"step": engine.step, "cfg": engine.cfg, "end_ids": engine.end_ids,
                    "batch_buckets": engine.batch_buckets, "tensor": engine.mesh.shape["tensor"]}


class ClusterEngine:
    """The ``Engine`` interface a ``Batcher`` drives, carried out on every host of ``group``."""

    def __init__(self, group: HostGroup, run_dir: str, step: int | None, max_batch: int):
        self.group = group
        loaded = group.load("restoring the params onto the hosts", engine_host, run_dir, step, max_batch)[0]
        self.step, self.cfg, self.end_ids = loaded["step"], loaded["cfg"], loaded["end_ids"]
        self.batch_buckets = loaded["batch_buckets"]  # what the Batcher reads of an engine, as the hosts built it
        group.echo(f"fax: serving step {self.step} on {group.layout.hosts} hosts "
                   f"(tensor parallel over {loaded['tensor']} devices)")

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def _call(self, method: str, *args: Any) -> Any:
        return self.group.call_all(f"engine {method}", method, *args)[0]

    def reset(self) -> None:
        self._call("reset")

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], sampling: Sequence[Any]) -> np.ndarray:
        return self._call("prefill", list(rows), [list(p) for p in prompts], list(sampling))

    def decode(self, tokens: np.ndarray, positions: np.ndarray, steps: np.ndarray, sampling: Sequence[Any]) -> np.ndarray:
        return self._call("decode", tokens, positions, steps, list(sampling))

    def score(self, tokens: Sequence[int]) -> tuple[np.ndarray, ...]:
        return self._call("score", list(tokens))

    def warm_up(self) -> None:
        """``Engine.warm_up`` on every host (within cluster.step_timeout_s, as any engine call)."""
        self._call("warm_up")

    def close(self) -> None:
        self.group.close()
