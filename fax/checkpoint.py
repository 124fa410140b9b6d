"""Sharded, asynchronous orbax checkpoints of a run, and restore onto any mesh.

A checkpoint of step s is the folder ``RUN_DIR/checkpoints/<s>`` with three items:
``params`` and ``opt_state`` (each process writes its own shards) and ``meta`` (JSON: step,
sampler position, the resolved config, the mesh it was saved on, the metrics at that step).
orbax writes into a temporary folder and renames it when every item is complete, so only
finished steps are listed; an interrupted save leaves a ``*.orbax-checkpoint-tmp*`` folder
that restore ignores and reports, and that nothing deletes.

The meta records a checksum of every array (``checksums``: computed on the devices, each over its
own shards, then summed; the same on any mesh), and a restore checks the arrays it read against
them: a step damaged on disk raises ``CheckpointDamaged`` naming it, rather than training on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fax.config import CheckpointConfig, ConfigError


class CheckpointDamaged(ConfigError):
    """A complete checkpoint step that cannot be read back as written (a file gone, truncated or
    changed, its metadata unreadable)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"the checkpoint of step {step} is damaged: {reason}")
        self.step, self.reason = step, reason

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # raised on a Ray worker, re-raised by the head
        return CheckpointDamaged, (self.step, self.reason)

TMP_MARKER = ".orbax-checkpoint-tmp"
# Model settings that change only how the step is computed, not the shapes a checkpoint holds: free to
# differ on resume and from an import (a mixture's dispatch and its router losses' weights, as the lr may)
COMPUTE_ONLY_MODEL_KEYS = {"dtype", "remat", "attention_impl", "moe_dispatch", "moe_capacity_factor", "moe_imbalance",
                           "moe_aux_loss", "moe_z_loss"}


class _QuietReadOnly(logging.Filter):
    """orbax warns on every read-only manager; inspecting a run's checkpoints is what read-only is for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


def checkpoint_dir(run_dir: str | Path, cfg: CheckpointConfig) -> str:
    return cfg.dir or str(Path(run_dir).absolute() / "checkpoints")


def abstract_like(tree: Any, shardings: Any) -> Any:
    """Restore targets: the shape and dtype of ``tree``'s leaves with the *current* shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def array_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """How orbax writes the state's arrays. Replica-parallel writing (orbax's default off GPUs) is kept
    for several processes, where it spreads a replicated array's writes over the hosts; in one process
    it spreads nothing and splits every replicated array into a slice per device, an op each, which
    made an async save block training several times longer. Small arrays are never split. (No array-metadata
    store: it exists for typed PRNG keys, which a train state does not hold.)"""
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                                            min_slice_bytes_for_replica_parallel=2 ** 20)
    return ocp.type_handlers.create_type_handler_registry(
        (jax.Array, arrays), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()))


def _weights(shape: tuple[int, ...]) -> jax.Array:
    """An odd 32-bit weight for each position of ``shape`` from its flat index (built per axis, so
    each device makes its own block's)."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis in range(len(shape)):
        stride = int(np.prod(shape[axis + 1:], dtype=np.int64)) % 2**32
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    return index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)


def _array_checksum(x: jax.Array) -> jax.Array:
    """32 bits over every element's bits, each weighted by its position in its row and each row by
    the row's position: a changed, moved or zeroed element changes it. One multiply-add pass: the
    weights of the rows are built on the row sums, not per element. Integer sums wrap the same in
    any order, so every mesh (each device over its own shards, then a sum) gives the same value."""
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
    if x.ndim == 0:
        return bits * jnp.uint32(0x45D9F3B)
    columns = jax.lax.broadcasted_iota(jnp.uint32, x.shape, x.ndim - 1) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
    rows = jnp.sum(bits * columns, axis=-1, dtype=jnp.uint32)
    return jnp.sum((rows ^ (rows >> 15)) * _weights(rows.shape), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def _path(keys: tuple) -> str:
    """A leaf's path as names alone ('1/0/mu/blocks/attn/wq'): the same for a state's named tuples
    and for the plain dicts and lists of the checkpoint's own metadata."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in keys)


def checksums(tree: Any) -> dict[str, str]:
    """Every array's checksum (8 hex digits) by its path in ``tree``."""
    values = jax.device_get(_checksums(tree))
    return {_path(path): f"{int(v):08x}" for path, v in jax.tree_util.tree_leaves_with_path(values)}


def mismatched(saved: dict[str, str], tree: Any) -> list[str]:
    """The paths of ``tree``'s arrays whose checksum is not the one ``saved``."""
    now = checksums(tree)
    return sorted(path for path in set(saved) | set(now) if saved.get(path) != now.get(path))


def _is_array_metadata(m: Any) -> bool:
    """Whether ``m`` is one array's entry in orbax's metadata of a tree (a leaf: shape and dtype)."""
    return hasattr(m, "shape") and hasattr(m, "dtype")


def _checked_meta(step: int, meta: Any) -> dict[str, Any]:
    """A step's meta as read back, or ``CheckpointDamaged`` where it is not one fax wrote."""
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointDamaged(step, "its meta (JSON) holds no step")
    return meta


def restore_args(target: Any, shardings: Any) -> ocp.args.PyTreeRestore:
    """Read ``target``'s arrays (shapes and dtypes) straight into ``shardings`` (any mesh)."""
    abstract = abstract_like(target, shardings)
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
    """Owns the orbax CheckpointManager of one run directory."""

    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(), read_only: bool = False):
        self.directory = epath.Path(directory)
        self.checksums = cfg.checksums
        if read_only:  # for inspection: no keep policy to apply, nothing created
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep or None,
                                                   keep_period=cfg.keep_every_n_steps or None,
                                                   enable_async_checkpointing=cfg.async_save)
        arrays = array_handlers()
        handlers = {item: ocp.PyTreeCheckpointHandler(type_handler_registry=arrays, use_compression=cfg.compress)
                    for item in ("params", "opt_state")}
        handlers["meta"] = ocp.JsonCheckpointHandler()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def complete_step(self, step: int | None, run_dir: str | Path) -> int:
        """``step``, or by default the latest complete one; a clear error where there is none."""
        step = self.latest_step() if step is None else step
        steps = self.steps()
        if step is None or step not in steps:
            fix = f"choose one of steps {steps}" if steps else f"train first (fax train run_dir={run_dir})"
            raise ConfigError(f"{str(run_dir)!r} has no complete checkpoint"
                              f"{'' if step is None else f' of step {step}'}; {fix}")
        return step

    def partial(self) -> list[str]:
        """Folders of saves that never completed (the process died while writing)."""
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir() if TMP_MARKER in p.name)

    def save(self, state: dict[str, Any], meta: dict[str, Any], wait: bool = False) -> bool:
        """Start writing ``state`` at its step; returns once the arrays are copied off the devices
        unless ``wait``. The previous save, if still writing, is finished first. False, writing
        nothing, where a complete checkpoint of the step is already there (one a run wrote before it
        was restarted from an earlier step: an exact resume reaches the same state)."""
        step = int(meta["step"])
        if (self.directory / str(step)).exists():
            return False
        if self.checksums:
            meta = {**meta, "checksums": {item: checksums(state[item]) for item in ("params", "opt_state")}}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(state["params"]),
            opt_state=ocp.args.PyTreeSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
        ), force=True)
        if wait:
            self.manager.wait_until_finished()
        return True

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _read(self, step: int, **items: Any) -> Any:
        """orbax's restore of ``items``; whatever keeps it from reading them is ``CheckpointDamaged``."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds for a damaged step)
            raise CheckpointDamaged(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                                    ) from e

    def _verified(self, step: int, meta: dict[str, Any], **trees: Any) -> None:
        """Raise ``CheckpointDamaged`` where a restored tree's arrays differ from what was written."""
        for item, tree in trees.items():
            saved = meta.get("checksums", {}).get(item)
            if saved is None:  # written before fax recorded checksums
                continue
            bad = mismatched(saved, tree)
            if bad:
                raise CheckpointDamaged(step, f"{item} arrays read back differ from those written: "
                                              f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")

    def restore(self, step: int, target: dict[str, Any], shardings: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """The train state of ``step`` placed in ``shardings`` (any mesh), and its metadata, checked
        against the checksums written with it."""
        restored = self._read(step, params=restore_args(target["params"], shardings["params"]),
                              opt_state=restore_args(target["opt_state"], shardings["opt_state"]),
                              meta=ocp.args.JsonRestore())
        meta = _checked_meta(step, restored.meta)
        self._verified(step, meta, params=restored.params, opt_state=restored.opt_state)
        step_array = jax.device_put(jax.numpy.int32(meta["step"]), shardings["step"])
        return {"step": step_array, "params": restored.params, "opt_state": restored.opt_state}, meta

    def restore_params(self, step: int, target: Any, shardings: Any) -> Any:
        """Parameters alone (for evaluation and serving), checked: the optimizer state is never read."""
        restored = self._read(step, params=restore_args(target, shardings), meta=ocp.args.JsonRestore())
        self._verified(step, _checked_meta(step, restored.meta), params=restored.params)
        return restored.params

    def read_arrays(self, step: int) -> dict[str, Any]:
        """The params and optimizer state of ``step`` on this process's first device, without a model
        or mesh."""
        where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = self._read_metadata(step)
        missing = [item for item in ("params", "opt_state") if saved.get(item) is None]
        if missing:
            raise CheckpointDamaged(step, f"its {' and '.join(missing)} are missing")
        shapes = {item: jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved[item],
                                     is_leaf=_is_array_metadata) for item in ("params", "opt_state")}
        restored = self._read(step, **{item: restore_args(tree, jax.tree.map(lambda _: where, tree))
                                       for item, tree in shapes.items()})
        return {item: restored[item] for item in shapes}

    def verify(self, step: int) -> None:
        """Check every array of ``step`` against its checksum (``read_arrays``); ``CheckpointDamaged``
        names what is wrong."""
        self._verified(step, self.meta(step), **self.read_arrays(step))

    def _read_metadata(self, step: int) -> Any:
        try:
            return self.manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001
            raise CheckpointDamaged(step, f"its array metadata is unreadable ({type(e).__name__})") from e

    def meta(self, step: int) -> dict[str, Any]:
        return _checked_meta(step, self._read(step, meta=ocp.args.JsonRestore()).meta)

    def array_metadata(self, step: int) -> dict[str, Any]:
        """Shapes and dtypes of the saved params, read from the checkpoint's own metadata."""
        tree = self._read_metadata(step)["params"]
        return jax.tree.map(lambda m: (tuple(m.shape), str(m.dtype)), tree, is_leaf=_is_array_metadata)

    def size_bytes(self, step: int) -> int:
        root = Path(str(self.directory / str(step)))
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Model and adapter settings that differ between a saved config and the current one and change
    what the checkpoint holds."""
    saved_model, model = saved.get("model", {}), current["model"]
    differs = [f"model.{k} (saved {saved_model.get(k)!r}, now {v!r})" for k, v in model.items()
               if k not in COMPUTE_ONLY_MODEL_KEYS and saved_model.get(k) != v]
    saved_lora = saved.get("lora") or {"rank": 0, "targets": []}
    adapters = {"rank": saved_lora["rank"], "targets": list(saved_lora["targets"]) if saved_lora["rank"] else []}
    now = {"rank": current["lora"]["rank"], "targets": list(current["lora"]["targets"]) if current["lora"]["rank"] else []}
    differs += [f"lora.{k} (saved {adapters[k]!r}, now {now[k]!r})" for k in adapters if adapters[k] != now[k]]
    return sorted(differs)
