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
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mesh_desc(axis_sizes: dict[str, int]) -> str:
    """'data=2 x tensor=4': the axes that split anything."""
    return " x ".join(f"{k}={v}" for k, v in axis_sizes.items() if v > 1) or "1 device"
