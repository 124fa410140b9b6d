"""Ray Data jobs: a dataset's files tokenized by a pool of actors (``fax prepare --engine ray``), and
any list of work items mapped through a pool of workers (``fax infer``)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.data

from fax.cluster.hosts import start_local_ray
from fax.data.prepare import ShardWriter, refuse_file


@contextlib.contextmanager
def ray_data_session() -> Iterator[Any]:
    """``ray.data`` on the running Ray cluster, or on a local one started for this block and shut
    down after it, its files (under /tmp) removed; Ray Data's own progress bars off (callers keep one
    bar)."""
    folder = None if ray.is_initialized() else tempfile.mkdtemp(prefix="fax-ray-", dir="/tmp")
    if folder:
        start_local_ray(folder, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray.data
    finally:
        if folder:
            ray.shutdown()
            shutil.rmtree(folder, ignore_errors=True)


def map_on_actors(items: list[dict[str, Any]], worker: type, args: tuple, on_row: Callable[[dict[str, Any]], None],
                  *, actors: int = 0, batch_size: int | None = None, **options: Any) -> None:
    """``worker(*args)`` on a pool of Ray Data workers, called on batches of ``items``; ``on_row`` sees
    each row they return, as it comes. ``actors``: exactly that many workers, a block of items
    each at a time; 0: from one up to the cluster's CPUs, a few items a block."""
    with ray_data_session() as data:
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        pool = (data.ActorPoolStrategy(size=actors) if actors else data.ActorPoolStrategy(min_size=1, max_size=cpus))
        blocks = len(items) if actors else min(len(items), 4 * cpus)
        mapped = data.from_items(items, override_num_blocks=blocks).map_batches(
            worker, fn_constructor_args=args, batch_size=batch_size, compute=pool, **options)
        for row in mapped.iter_rows():
            on_row(row)


def tokenize_on_ray(todo: list[tuple[str, str]], writer_args: tuple, bar: Any) -> None:
    """``fax.data.prepare``'s files tokenized by Ray Data, a few files per task, one ``ShardWriter``
    per worker and one tokenizer thread each: the pool, not each worker, spreads over the cores."""
    def done(row: dict[str, Any]) -> None:
        refuse_file([row["error"]])
        bar.update(1)

    map_on_actors([{"path": p, "key": k} for p, k in todo], ShardWriter, writer_args, done,
                  runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
