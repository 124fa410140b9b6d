"""Throughput and MFU, and the metrics log.

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s per device x devices).
Model FLOPs count forward and backward once (6 per matmul parameter plus attention, see
models.config.train_flops_per_token); recomputation from remat is not credited.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


# Dense bf16 peak FLOP/s per device, matched against jax's device_kind (lower-cased, first hit wins).
PEAK_FLOPS = (
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),  # SXM; the PCIe card peaks at 756e12
    ("a100", 312e12),
)
# CPUs have no datasheet peak worth the name: count a nominal 100 GFLOP/s per core, shared by
# the emulated devices. Set train.peak_flops_per_device for a real figure.
CPU_FLOPS_PER_CORE = 100e9


def peak_flops_per_device(device_kind: str, platform: str, n_local_devices: int) -> float:
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    if platform == "cpu":
        return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) / n_local_devices
    raise ValueError(f"no peak FLOP/s known for device kind {device_kind!r}; set train.peak_flops_per_device")


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_device: float, n_devices: int) -> float:
    return flops_per_token * tokens_per_s / (peak_per_device * n_devices)


class MetricsLog:
    """One JSON object per logged step, appended and flushed so a crash loses nothing logged."""

    def __init__(self, path: str | Path, keep: list[dict[str, Any]] = ()):
        self.path = Path(path)
        self._file = open(self.path, "w")
        for record in keep:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log. Text after the last newline is a record the process died while
    writing (each is written whole with its newline): left out, where it would stop a resume."""
    records = []
    for number, line in enumerate(Path(path).read_text().split("\n")[:-1], 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not a metrics record ({e})") from None
    return records


def run_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run directory's logged steps; FileNotFoundError names the directory if it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl: not a run directory (fax train "
                                f"run_dir={run_dir} writes one)")
    return read_metrics(path)


def _at_best(records: list[dict[str, Any]], key: str) -> str:
    """'2.0312 (190)': the lowest ``key`` logged and its step; '-' if none was."""
    logged = [r for r in records if key in r]
    if not logged:
        return "-"
    best = min(logged, key=lambda r: r[key])
    return f"{best[key]:.4f} ({best['step']})"


def summary_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """One line per run, to compare runs at a glance: the last logged step, loss first -> last and
    its best, the last and best validation loss, and the median tokens/s and MFU (medians, since
    the first logged steps carry the warm-up)."""
    width = max(len("run"), *map(len, runs)) + 2
    lines = [f"{'run':<{width}}{'step':>8}  {'loss first -> last':<20}{'best (step)':<18}{'val_loss':>9}  "
             f"{'best (step)':<18}{'tokens/s':>11}{'mfu':>8}"]
    for name, records in runs.items():
        if not records:
            lines.append(f"{name:<{width}}{'-':>8}  no steps logged yet")
            continue
        first, last = records[0], records[-1]
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        loss = f"{first['loss']:.4f} -> {last['loss']:.4f}"
        val = f"{vals[-1]:.4f}" if vals else "-"
        speed = np.median([r["tokens_per_s"] for r in records])
        util = np.median([r["mfu"] for r in records])
        lines.append(f"{name:<{width}}{last['step']:>8}  {loss:<20}{_at_best(records, 'loss'):<18}{val:>9}  "
                     f"{_at_best(records, 'val_loss'):<18}{speed:>11,.0f}{util:>8.2%}")
    return "\n".join(lines)


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Any:
    """Loss (validation dashed), tokens/s, MFU and learning rate against the step, a line per run,
    written to ``path`` (its suffix picks the format: .png, .svg, .pdf). Returns the figure."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    fig = Figure(figsize=(11, 7), layout="constrained")
    titles = {"loss": "loss (dashed: val_loss)", "tokens_per_s": "tokens/s", "mfu": "MFU", "lr": "learning rate"}
    panels = dict(zip(titles, fig.subplots(2, 2).flat))
    for key, ax in panels.items():
        ax.set(xlabel="step", title=titles[key])
        ax.grid(alpha=0.3)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in records]
        for key, ax in panels.items():
            ax.plot(steps, [r[key] for r in records], color=color, label=name)
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            panels["loss"].plot(*zip(*val), color=color, linestyle="--", marker=".")
    panels["mfu"].yaxis.set_major_formatter(lambda y, _: f"{y:.1%}")
    panels["loss"].legend()
    fig.savefig(path)
    return fig


def mesh_desc(axis_sizes: dict[str, int]) -> str:
    """'data=2 x tensor=4': the axes that split anything."""
    return " x ".join(f"{k}={v}" for k, v in axis_sizes.items() if v > 1) or "1 device"
