"""Reading a compiled, partitioned program: the memory it needs per device, and its collectives by kind
and by the mesh axes they run over."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from typing import Any

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")  # mesh['a'=4,'b'=2] {'a'}
# XLA:TPU runs a reduce-scatter as a fusion of its own whose body is a (padded) all-reduce and a slice
FUSED_REDUCE_SCATTER = "all-reduce-scatter"


def memory_needed(memory: Any, platform: str) -> float:
    """The bytes per device a program compiled for ``platform`` needs, by XLA's own account (its
    ``memory_analysis()``). XLA:TPU simulates its heap and checks the peak against HBM (a program whose
    peak fits compiles, one whose does not is refused), while its temporaries' figure counts buffers
    that the peak shows never live at once. The other backends report no peak (the arguments'), so
    there it is arguments + outputs - donated + temporaries."""
    if platform == "tpu":
        return float(memory.peak_memory_in_bytes)
    return float(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                 + memory.temp_size_in_bytes)


# The share of device memory a compiled step may use off TPUs, where the runtime keeps a little for
# itself (XLA:TPU checks its peak against what it may use). Predictions keep ``MEMORY_HEADROOM``.
COMPILED_HEADROOM = 0.95


def compiled_share(platform: str) -> float:
    """The share of a device's memory a compiled program may need on ``platform``."""
    return 1.0 if platform == "tpu" else COMPILED_HEADROOM


def fits_device(needed: float, hbm_bytes: float, platform: str) -> bool:
    """Whether a compiled program that needs ``needed`` bytes (``memory_needed``) fits a device."""
    return needed <= compiled_share(platform) * hbm_bytes


def group_size(line: str) -> int | None:
    """How many devices each group of a collective's instruction holds (None: not stated)."""
    mesh = _MESH_GROUPS.search(line)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota.group(2))
    explicit = _EXPLICIT_GROUPS.search(line)
    return len(explicit.group(1).split(",")) if explicit and explicit.group(1) else None


def axes_of(size: int, axis_sizes: dict[str, int]) -> str:
    """The mesh axes whose devices make up groups of ``size`` (alternatives joined by " or ")."""
    split = {k: v for k, v in axis_sizes.items() if v > 1}
    matches = [" x ".join(combo) for n in range(1, len(split) + 1) for combo in itertools.combinations(split, n)
               if math.prod(split[a] for a in combo) == size]
    return " or ".join(matches) or f"{size} devices"


def computation_name(line: str) -> str | None:
    """The name of the computation a line of HLO text (``compiled.as_text()``) opens, else None."""
    if " -> " not in line or not line.rstrip().endswith("{"):
        return None
    return line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")


def collectives(hlo: str, axis_sizes: dict[str, int]) -> dict[str, int]:
    """Occurrences of each collective in ``hlo`` (``compiled.as_text()``), by kind and the mesh axes
    it runs over, e.g. ``{"all-gather over fsdp": 12}``; a point-to-point permute has no axes. The all-reduce
    inside XLA:TPU's reduce-scatter fusion counts as the reduce-scatter it is."""
    found: Counter[str] = Counter()
    scattering = False  # inside the body of a reduce-scatter fusion
    for line in hlo.splitlines():
        if (name := computation_name(line)) is not None:
            scattering = name.startswith(FUSED_REDUCE_SCATTER)
        op = _OP.search(line)
        if not op or "-done(" in line:
            continue
        kind = "reduce-scatter" if scattering and op.group(1) == "all-reduce" else op.group(1)
        size = group_size(line)
        found[kind if size is None else f"{kind} over {axes_of(size, axis_sizes)}"] += 1
    return dict(sorted(found.items()))
