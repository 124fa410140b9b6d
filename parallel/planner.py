"""Search pipeline stages x per-stage sharding x microbatches x remat for the fastest layout that fits.

Every candidate is first checked for divisibility (cheap, exact), then for memory, and only then
costed (``parallel.cost``). The practitioners' templates are part of the search, so the pick is never
predicted slower than the best of them. The same inputs always give the same plan.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from fax.models.config import ModelConfig, expert_indivisible, stack_units, tensor_indivisible
from fax.parallel.cost import Estimate, dcn_shares, estimate, step_floor
from fax.parallel.layout import Candidate, Workload
from fax.parallel.memory import MEMORY_HEADROOM, memory
from fax.parallel.hardware import ClusterSpec

MAX_MICROBATCHES = 1024
# Remat policies searched (the cost model also prices the other named ones, e.g. a plan file's save_qkv_proj).
PLANNED_REMAT = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")
# Pieces of the sequence for the LM head and loss, tried (fewest first: larger matmuls, fewer loop
# steps) where the whole logits do not fit.
LOSS_CHUNKS = (2, 4, 8, 16, 32)
DOMINATED = "dominated (slower with more microbatches)"
OUTRUN = "outrun (slower at best than the fastest layouts)"
ALTERNATIVES = 3  # runners-up a plan explains


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every ordered way to write ``n`` as a product of ``parts`` factors."""
    if parts == 1:
        yield (n,)
        return
    for d in divisors(n):
        for rest in factorizations(n // d, parts - 1):
            yield (d, *rest)


def problems(c: Candidate, w: Workload) -> list[tuple[str, str]]:
    """Why a layout cannot run this model and batch at all, as (kind, message) (empty: it can)."""
    m, found = w.model, []
    if stack_units(m) % (c.stages * c.virtual_stages):
        found.append(("stages", f"the stack's {stack_units(m)} blocks do not split into {c.stages} stages x "
                                f"{c.virtual_stages} virtual stages"))
    found.extend(("stages", problem) for problem in c.schedule.problems())
    indivisible = tensor_indivisible(m, c.tensor)
    if indivisible:
        found.append(("tensor", f"tensor={c.tensor} does not divide {indivisible}={getattr(m, indivisible)}"))
    if m.d_model % (c.fsdp * c.expert):
        found.append(("fsdp", f"fsdp={c.fsdp} x expert={c.expert} does not divide d_model={m.d_model}"))
    if expert_indivisible(m, c.expert):
        found.append(("expert", f"expert={c.expert} does not divide the {m.moe_experts} experts"))
    if w.global_batch % (c.batch_shards * c.microbatches):
        found.append(("batch", f"batch {w.global_batch} does not split into data x fsdp x expert x microbatches = "
                               f"{c.batch_shards * c.microbatches}"))
    if w.slice_devices and dcn_shares(c, w.slice_devices) is None:
        found.append(("slices", f"its axes do not split evenly into slices of {w.slice_devices} devices with only "
                                "stage, data and fsdp across them (the data-centre network)"))
    if w.seq_len % c.sequence:
        found.append(("sequence", f"sequence={c.sequence} does not divide the sequence length {w.seq_len}"))
    elif w.seq_len % (c.sequence * c.loss_chunks):
        found.append(("sequence", f"{c.loss_chunks} loss pieces of the sequence length {w.seq_len} do not split "
                                  f"over sequence={c.sequence}"))
    return found


def templates(cluster: ClusterSpec, w: Workload) -> dict[str, Candidate]:
    """What practitioners pick by hand: FSDP everywhere; Megatron (tensor inside a host, pipeline
    across hosts, data outermost); tensor inside a host with FSDP across."""
    n, host = cluster.devices, cluster.devices_per_host
    tensor = max(t for t in divisors(min(host, n)) if not tensor_indivisible(w.model, t))
    stages = max((s for s in divisors(cluster.hosts) if stack_units(w.model) % s == 0), default=1)
    rest = n // (tensor * stages)
    micro = next((mb for mb in (4 * stages, 2 * stages, stages, 1)
                  if w.global_batch % (rest * mb) == 0), 1)
    return {"fsdp": Candidate(fsdp=n, remat="full"),
            "megatron": Candidate(stages=stages, microbatches=micro, data=rest, tensor=tensor, remat="full"),
            "tensor+fsdp": Candidate(fsdp=n // tensor, tensor=tensor, remat="full")}


def meshes(cluster: ClusterSpec, w: Workload, max_stages: int | None = None) -> Iterator[Candidate]:
    """Every split of the devices into stage x data x fsdp x expert x sequence x tensor (one microbatch,
    no remat); the expert axis only for a mixture of experts, in sizes that divide its experts."""
    experts = [e for e in divisors(w.model.moe_experts) if cluster.devices % e == 0] if w.model.moe_experts else [1]
    for stages in divisors(cluster.devices):
        if max_stages is not None and stages > max_stages or stages > stack_units(w.model):
            continue
        for expert in experts:
            if (cluster.devices // stages) % expert:
                continue
            for data, fsdp, sequence, tensor in factorizations(cluster.devices // (stages * expert), 4):
                yield Candidate(stages, 1, data, fsdp, sequence, tensor, expert=expert)


def schedules(mesh: Candidate, w: Workload) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """For one mesh, each way to run it (remat policy, pipeline schedule, sequence parallelism, as
    ``Candidate`` fields) with its microbatch counts, fewest first (the divisors of each replica's
    batch): more of them, less memory."""
    counts = [mb for mb in divisors(w.global_batch // mesh.batch_shards) if mb <= MAX_MICROBATCHES]
    kinds: list[dict[str, Any]] = [dict(remat=remat) for remat in PLANNED_REMAT]
    if mesh.stages > 1:  # the pipeline's own schedules (the stage recomputed needs no layer remat)
        kinds.append(dict(remat="none", stage_remat=True))
        if stack_units(w.model) % (2 * mesh.stages) == 0:  # interleaved (bounded too)
            kinds.append(dict(remat="none", stage_remat=True, virtual_stages=2))
    for split in (False, True) if mesh.tensor > 1 else (False,):
        for kind in kinds:
            interleaved = kind.get("virtual_stages", 1) > 1
            yield {**kind, "tensor_sequence": split}, [mb for mb in counts if not interleaved or mb % mesh.stages == 0]


def fitting_pieces(c: Candidate, w: Workload, budget: float) -> tuple[Candidate | None, float]:
    """``c``, or ``c`` with the LM head and loss in the fewest pieces that fit ``budget`` bytes per
    device (None when neither fits); and the bytes ``c`` needs whole."""
    found = memory(c, w)
    total = sum(found.values())
    if total <= budget:
        return c, total
    for n in LOSS_CHUNKS:
        if found["logits"] * (1 - 1 / n) >= total - budget and not problems(
                pieces := dataclasses.replace(c, loss_chunks=n), w):
            return pieces, total
    return None, total


def fewest_fitting(counts: list[int], run: Callable[[int], Candidate], w: Workload, budget: float) -> int:
    """The index in ``counts`` (ascending) of the fewest microbatches with which a layout fits
    ``budget`` (``len(counts)``: none does). Past one its memory only falls as they grow (fewer tokens
    at a time; a pipeline's states in flight, ticks x tokens per microbatch, too), so a bisection
    finds it; one microbatch, which keeps no running sum of gradients, is tried on its own."""
    def fits(index: int) -> bool:
        return fitting_pieces(run(counts[index]), w, budget)[0] is not None

    low, high = int(counts[:1] == [1]), len(counts)  # past one, if one is the first
    if low and fits(0):
        return 0
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low


@dataclass(frozen=True)
class Compiled:
    """What XLA reports for a candidate's step compiled on the present devices (per device)."""

    layout: str
    predicted_s: float
    predicted_memory_bytes: float
    memory_bytes: float  # XLA's (``memory_needed``)
    fits: bool
    flops: float  # XLA's count, which takes a loop body once: a floor for scanned layers
    collectives: dict[str, int]  # op -> occurrences in the partitioned program
    compile_s: float
    measured_s: float | None = None


@dataclass
class Plan:
    """The chosen layout, the runners-up, what was rejected and why, and the predictions."""

    cluster: str
    model: str
    global_batch: int
    seq_len: int
    best: Estimate
    ranked: list[Estimate]
    templates: dict[str, Estimate | str]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> candidates
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one candidate it rejected
    searched: int = 0
    seconds: float = 0.0
    analytical: bool = True  # not compiled on present devices
    validated: list[Compiled] = field(default_factory=list)  # the candidates compiled, in ranked order
    alternatives: list[tuple[Estimate, str]] = field(default_factory=list)  # runners-up, each with why it lost

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "model": self.model, "global_batch": self.global_batch,
                "seq_len": self.seq_len, "analytical": self.analytical, "searched": self.searched,
                "seconds": self.seconds, "best": self.best.to_dict(), "ranked": [e.to_dict() for e in self.ranked],
                "templates": {k: v if isinstance(v, str) else v.to_dict() for k, v in self.templates.items()},
                "rejected": self.rejected, "examples": self.examples,
                "validated": [asdict(c) for c in self.validated], "breakdown": self.best.breakdown(),
                "alternatives": [{"layout": e.candidate.describe(), "step_s": e.step_s, "why": why}
                                 for e, why in self.alternatives]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def fitted(c: Candidate, w: Workload, cluster: ClusterSpec, memory_share: float = MEMORY_HEADROOM) -> Estimate:
    """``c``'s estimate; where it does not fit but does with the LM head and loss in pieces, that of
    the fewest pieces that fit."""
    pieces, _ = fitting_pieces(c, w, memory_share * cluster.device.hbm_bytes)
    return estimate(pieces or c, w, cluster, memory_share)


def workload(model: ModelConfig, cluster: ClusterSpec, global_batch: int, seq_len: int) -> Workload:
    return Workload(model, global_batch, seq_len, cluster.device.platform,
                    cluster.slice_devices if cluster.slices > 1 else 0)


def plan(model: ModelConfig, cluster: ClusterSpec, global_batch: int, seq_len: int, name: str = "",
         top: int = 10, max_stages: int | None = None, memory_share: float = MEMORY_HEADROOM) -> Plan:
    """The fastest predicted layout that fits, with the ``top`` best and the rejected ones counted; a
    layout that does not fit is tried again with the LM head and loss in pieces (``fitting_pieces``).
    Without a pipeline more microbatches only cost time, so a way of running a mesh stops at the
    fewest that fit; a pipeline's bubble shrinks with them until its matmuls get too short, so it goes
    on until a count is slower than the one before. A layout fits where its predicted memory is within
    ``memory_share`` of the device's: ``MEMORY_HEADROOM``, a margin for the prediction's error, where
    nothing checks the pick; the compiler's own limit (``hlo.compiled_share``) where the ranking is
    compiled before use, so that the compiler, not the margin, turns away those that do not fit."""
    started = time.perf_counter()
    w = workload(model, cluster, global_batch, seq_len)
    budget = memory_share * cluster.device.hbm_bytes
    rejected: Counter[str] = Counter()
    examples: dict[str, str] = {}
    fitting: list[Estimate] = []
    searched = 0
    # The fastest step of each kind of layout found (``layout_kind``), and the step time past which a
    # layout can be neither among the ``top`` nor a runner-up the plan explains: the ``keep``-th fastest
    # kind's (there are at least ``keep`` layouts faster than it, one of each of those kinds).
    fastest_by_kind: dict[Candidate, float] = {}
    keep, outrun = max(top, ALTERNATIVES + 1), math.inf

    def record(e: Estimate) -> None:
        nonlocal outrun
        fitting.append(e)
        kind = layout_kind(e.candidate)
        if e.step_s < fastest_by_kind.get(kind, math.inf):
            fastest_by_kind[kind] = e.step_s
            if e.step_s < outrun and len(fastest_by_kind) >= keep:
                outrun = heapq.nsmallest(keep, fastest_by_kind.values())[-1]

    def reject(reason: str, c: Candidate, message: str, count: int = 1) -> None:
        rejected[reason] += count
        if reason not in examples:  # one example each (described once: most candidates are rejected)
            examples[reason] = f"{c.describe()}: {message}"

    named = templates(cluster, w)
    for c in named.values():
        searched += 1
        if not problems(c, w) and (e := fitted(c, w, cluster, memory_share)).fits:
            record(e)
    for mesh in meshes(cluster, w, max_stages):
        if found := problems(mesh, w):  # one microbatch: the batch problem is the batch shards' own
            kind, message = found[0]
            searched += 1
            reject(f"indivisible {kind}", mesh, message)
            continue
        state = sum(v for k, v in memory(mesh, w).items() if k in ("params", "grads", "optimizer", "update"))
        ways = list(schedules(mesh, w))
        if state > budget:  # the parameters and optimizer state alone: no schedule helps
            count = sum(len(counts) for _, counts in ways)
            searched += count
            reject("out of memory", mesh, f"needs {state / 2 ** 30:.1f} GiB per device for the parameters and "
                   f"optimizer state alone, of {cluster.device.hbm_bytes / 2 ** 30:.0f} GiB", count)
            continue
        axes = mesh.axes
        for kind, counts in ways:
            searched += len(counts)
            previous = None

            def run(mb: int) -> Candidate:
                return Candidate(mesh.stages, mb, axes["data"], axes["fsdp"], axes["sequence"], axes["tensor"],
                                 expert=axes["expert"], **kind)

            if not counts:
                continue
            fewest = run(counts[0])
            if (floor := step_floor(fewest, w, cluster)) > outrun:
                reject(OUTRUN, fewest, f"takes at least {floor:.3g} s per step (compute and exposed collectives), "
                       f"more than {keep} faster kinds of layout", len(counts))
                continue
            start = fewest_fitting(counts, run, w, budget)
            if start:  # the counts below it do not fit; the fewest are the example
                needs = fitting_pieces(fewest, w, budget)[1] if "out of memory" not in examples else 0.0
                reject("out of memory", fewest, f"needs {needs / 2 ** 30:.1f} GiB per device of "
                                                f"{cluster.device.hbm_bytes / 2 ** 30:.0f} GiB", start)
            for i, mb in enumerate(counts[start:], start):
                c = run(mb)
                pieces, _ = fitting_pieces(c, w, budget)
                e = estimate(pieces, w, cluster, memory_share)
                record(e)
                if c.stages == 1 or previous is not None and e.step_s > previous:
                    if len(counts) - i - 1:
                        reject(DOMINATED, c, f"fits in {mb} microbatches; more only cost time" if c.stages == 1
                               else f"{mb} microbatches are slower than {counts[i - 1]}", len(counts) - i - 1)
                    break
                previous = e.step_s
    unique = {e.candidate: e for e in fitting}
    ranked = sorted(unique.values(), key=lambda e: (e.step_s, e.memory_bytes, repr(e.candidate)))
    if not ranked:
        shown = [examples[r] for r, _ in rejected.most_common() if r != DOMINATED][:3]
        raise ValueError(f"no layout of {name or 'the model'} fits {cluster.name} with batch {global_batch} x "
                         f"{seq_len}: " + "; ".join(shown))
    by_template = {}
    for key, c in named.items():
        issue = problems(c, w)
        by_template[key] = "; ".join(m for _, m in issue) if issue else (
            unique.get(fitted(c, w, cluster, memory_share).candidate) or "out of memory")
    return Plan(cluster.name, name, global_batch, seq_len, ranked[0], ranked[:top], by_template,
                dict(rejected.most_common()), examples, searched, time.perf_counter() - started,
                analytical=not cluster.present, alternatives=alternatives(ranked[0], ranked))


def layout_changes(pick: Candidate, other: Candidate) -> str:
    """How ``other`` is laid out differently from ``pick``, field by field."""
    changed = [f"{f.name} {getattr(other, f.name)} (pick: {getattr(pick, f.name)})"
               for f in dataclasses.fields(Candidate) if getattr(other, f.name) != getattr(pick, f.name)]
    return ", ".join(changed) or "the same layout"


def why_slower(pick: Estimate, other: Estimate, terms: int = 3) -> str:
    """Where ``other`` spends more time than ``pick`` (the largest of ``breakdown``'s differences), and
    how its layout differs: one line."""
    mine, theirs = pick.breakdown(), other.breakdown()
    gaps = sorted(((theirs.get(k, 0.0) - mine.get(k, 0.0), k) for k in {*mine, *theirs}), reverse=True)
    shown = [f"{k} {gap:+.3g} s" for gap, k in gaps[:terms] if gap > 0.005 * other.step_s]
    ratio = other.step_s / pick.step_s
    return (f"{ratio:.2f}x the pick's step time" + (f": {', '.join(shown)}" if shown else "")
            + f" ({layout_changes(pick.candidate, other.candidate)})")


def layout_kind(c: Candidate) -> Candidate:
    """``c`` but for how the batch splits between data and fsdp: the mesh's other axes, remat, schedule."""
    return dataclasses.replace(c, data=1, fsdp=1)


def alternatives(best: Estimate, ranked: list[Estimate], count: int = ALTERNATIVES) -> list[tuple[Estimate, str]]:
    """The runners-up nearest the pick of other kinds than its and each other's (``layout_kind``), each
    with why it lost."""
    seen, found = {layout_kind(best.candidate)}, []
    for e in ranked:
        if len(found) == count:
            break
        if layout_kind(e.candidate) not in seen:
            seen.add(layout_kind(e.candidate))
            found.append((e, why_slower(best, e)))
    return found


def load_layout(path: str) -> Candidate:
    """The layout a plan file picks: a ``fax plan --json`` plan, or a hand-written
    ``{"stages": 1, "data": 2, "fsdp": 4, "tensor": 1, "microbatches": 1, "remat": "none"}``; the
    same JSON written inline (starting with ``{``) is read as is."""
    if path.lstrip().startswith("{"):
        values = json.loads(path)
    else:
        with open(path) as f:
            values = json.load(f)
    layout = values["best"]["candidate"] if "best" in values else values
    unknown = set(layout) - {f.name for f in dataclasses.fields(Candidate)}
    if unknown:
        raise ValueError(f"plan {path}: unknown layout keys {sorted(unknown)}; "
                         f"known: {[f.name for f in dataclasses.fields(Candidate)]}")
    return Candidate(**layout)
