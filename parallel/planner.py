"""Search pipeline stages x per-stage sharding x microbatches x remat for the fastest layout that fits.

Every candidate is first checked for divisibility (cheap, exact), then for memory, and only then
costed (``parallel.cost``). The practitioners' templates are part of the search, so the pick is never
predicted slower than the best of them. The same inputs always give the same plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from fax.models.config import ModelConfig, tensor_indivisible
from fax.parallel.cost import MEMORY_HEADROOM, Candidate, Estimate, Workload, estimate
from fax.parallel.hardware import ClusterSpec
from fax.parallel.hlo import COLLECTIVES

MAX_MICROBATCHES = 64
# Remat policies searched (the cost model also prices the named ones, e.g. a plan file's save_qkv_proj).
PLANNED_REMAT = ("none", "dots_saveable", "full")
# Pieces of the sequence for the LM head and loss, tried (fewest first: larger matmuls, fewer loop
# steps) where the whole logits do not fit.
LOSS_CHUNKS = (2, 4, 8, 16, 32)


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
    if m.n_layers % (c.stages * c.virtual_stages):
        found.append(("stages", f"{m.n_layers} layers do not split into {c.stages} stages x {c.virtual_stages} "
                                "virtual stages"))
    found.extend(("stages", problem) for problem in c.schedule.problems())
    indivisible = tensor_indivisible(m, c.tensor)
    if indivisible:
        found.append(("tensor", f"tensor={c.tensor} does not divide {indivisible}={getattr(m, indivisible)}"))
    if m.d_model % c.fsdp:
        found.append(("fsdp", f"fsdp={c.fsdp} does not divide d_model={m.d_model}"))
    if w.global_batch % (c.data * c.fsdp * c.microbatches):
        found.append(("batch", f"batch {w.global_batch} does not split into data x fsdp x microbatches = "
                               f"{c.data * c.fsdp * c.microbatches}"))
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
    stages = max((s for s in divisors(cluster.hosts) if w.model.n_layers % s == 0), default=1)
    rest = n // (tensor * stages)
    micro = next((mb for mb in (4 * stages, 2 * stages, stages, 1)
                  if w.global_batch % (rest * mb) == 0), 1)
    return {"fsdp": Candidate(fsdp=n, remat="full"),
            "megatron": Candidate(stages=stages, microbatches=micro, data=rest, tensor=tensor, remat="full"),
            "tensor+fsdp": Candidate(fsdp=n // tensor, tensor=tensor, remat="full")}


def candidates(cluster: ClusterSpec, w: Workload, max_stages: int | None = None) -> Iterator[Candidate]:
    for stages in divisors(cluster.devices):
        if max_stages is not None and stages > max_stages or stages > w.model.n_layers:
            continue
        for data, fsdp, sequence, tensor in factorizations(cluster.devices // stages, 4):
            for mb in (2 ** i for i in range(7)):
                if mb > MAX_MICROBATCHES or w.global_batch % (data * fsdp * mb):
                    continue
                for remat in PLANNED_REMAT:
                    yield Candidate(stages, mb, data, fsdp, sequence, tensor, remat)
                if stages > 1:  # the pipeline's own schedules (the stage recomputed needs no layer remat)
                    yield Candidate(stages, mb, data, fsdp, sequence, tensor, "none", stage_remat=True)
                    if mb % stages == 0 and w.model.n_layers % (2 * stages) == 0:  # interleaved (bounded too)
                        yield Candidate(stages, mb, data, fsdp, sequence, tensor, "none", virtual_stages=2,
                                        stage_remat=True)


@dataclass(frozen=True)
class Compiled:
    """What XLA reports for a candidate's step compiled on the present devices (per device)."""

    layout: str
    predicted_s: float
    predicted_memory_bytes: float
    memory_bytes: float  # arguments + outputs - donated + temporaries
    fits: bool
    flops: float  # XLA's count, which takes a loop body once: a floor for scanned layers
    collectives: dict[str, int]  # op -> occurrences in the partitioned program
    compile_s: float
    measured_s: float | None = None


def compiled_figures(e: Estimate, compiled: Any, compile_s: float, hbm_bytes: float) -> Compiled:
    mem = compiled.memory_analysis()
    used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    hlo = compiled.as_text()
    ops = {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES}
    return Compiled(e.candidate.describe(), e.step_s, e.memory_bytes, float(used), used <= MEMORY_HEADROOM * hbm_bytes,
                    float((compiled.cost_analysis() or {}).get("flops", 0.0)), {k: v for k, v in ops.items() if v},
                    compile_s)


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

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "model": self.model, "global_batch": self.global_batch,
                "seq_len": self.seq_len, "analytical": self.analytical, "searched": self.searched,
                "seconds": self.seconds, "best": self.best.to_dict(), "ranked": [e.to_dict() for e in self.ranked],
                "templates": {k: v if isinstance(v, str) else v.to_dict() for k, v in self.templates.items()},
                "rejected": self.rejected, "examples": self.examples,
                "validated": [asdict(c) for c in self.validated]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def fitted(c: Candidate, w: Workload, cluster: ClusterSpec) -> Estimate:
    """``c``'s estimate; where it does not fit but does with the LM head and loss in pieces, that of
    the fewest pieces that fit."""
    e = estimate(c, w, cluster)
    if e.fits:
        return e
    for n in LOSS_CHUNKS:
        pieces = dataclasses.replace(c, loss_chunks=n)
        if not problems(pieces, w) and (in_pieces := estimate(pieces, w, cluster)).fits:
            return in_pieces
    return e


def plan(model: ModelConfig, cluster: ClusterSpec, global_batch: int, seq_len: int, name: str = "",
         top: int = 10, max_stages: int | None = None) -> Plan:
    """The fastest predicted layout that fits, with the ``top`` best and the rejected ones counted; a
    layout that does not fit is tried again with the LM head and loss in pieces (``fitted``)."""
    started = time.perf_counter()
    w = Workload(model, global_batch, seq_len, cluster.device.platform)
    rejected: Counter[str] = Counter()
    examples: dict[str, str] = {}
    fitting: list[Estimate] = []
    searched = 0
    named = templates(cluster, w)
    for c in itertools.chain(named.values(), candidates(cluster, w, max_stages)):
        searched += 1
        found = problems(c, w)
        if not found:
            e = fitted(c, w, cluster)
            if e.fits:
                fitting.append(e)
                continue
            found = [("memory", f"needs {e.memory_bytes / 2 ** 30:.1f} GiB per device of "
                                f"{cluster.device.hbm_bytes / 2 ** 30:.0f} GiB")]
        kind, message = found[0]
        reason = "out of memory" if kind == "memory" else f"indivisible {kind}"
        rejected[reason] += 1
        examples.setdefault(reason, f"{c.describe()}: {message}")
    unique = {e.candidate: e for e in fitting}
    ranked = sorted(unique.values(), key=lambda e: (e.step_s, e.memory_bytes, repr(e.candidate)))
    if not ranked:
        raise ValueError(f"no layout of {name or 'the model'} fits {cluster.name} with batch {global_batch} x "
                         f"{seq_len}: " + "; ".join(examples[r] for r, _ in rejected.most_common(3)))
    by_template = {}
    for key, c in named.items():
        issue = problems(c, w)
        by_template[key] = "; ".join(m for _, m in issue) if issue else (
            unique.get(fitted(c, w, cluster).candidate) or "out of memory")
    return Plan(cluster.name, name, global_batch, seq_len, ranked[0], ranked[:top], by_template,
                dict(rejected.most_common()), examples, searched, time.perf_counter() - started,
                analytical=not cluster.present)


def load_layout(path: str) -> Candidate:
    """The layout a plan file picks: a ``fax plan --json`` plan, or a hand-written
    ``{"stages": 1, "data": 2, "fsdp": 4, "tensor": 1, "microbatches": 1, "remat": "none"}``."""
    with open(path) as f:
        values = json.load(f)
    layout = values["best"]["candidate"] if "best" in values else values
    unknown = set(layout) - {f.name for f in dataclasses.fields(Candidate)}
    if unknown:
        raise ValueError(f"plan {path}: unknown layout keys {sorted(unknown)}; "
                         f"known: {[f.name for f in dataclasses.fields(Candidate)]}")
    return Candidate(**layout)


def out_of_memory(error: BaseException) -> bool:
    """Whether an XLA error says a device ran out of memory (compiling, autotuning or running)."""
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def _reject_unfit(result: Plan, example: str) -> None:
    reason = "out of memory (compiled)"
    result.rejected[reason] = result.rejected.get(reason, 0) + 1
    result.examples.setdefault(reason, example)


def validate(result: Plan, compile_candidate: Callable[[Candidate], Any], hbm_bytes: float, k: int = 3,
             measure: Callable[[Candidate], float] | None = None) -> Plan:
    """Compile the ranked candidates on the present devices until ``k`` fit (or the list ends); those
    that do not fit are rejected. The pick is the first that fits, or with ``measure`` the fastest
    measured. Predicted and compiled figures are recorded side by side."""
    fitting: list[tuple[Estimate, Compiled]] = []
    for e in result.ranked:
        started = time.perf_counter()
        try:
            compiled = compile_candidate(e.candidate)
            figures = compiled_figures(e, compiled, time.perf_counter() - started, hbm_bytes)
            if figures.fits and measure is not None:
                figures = dataclasses.replace(figures, measured_s=measure(e.candidate))
        except Exception as error:  # XLA ran out of memory compiling (autotuning) or running it: does not fit
            if not out_of_memory(error):
                raise
            _reject_unfit(result, f"{e.candidate.describe()}: {str(error).splitlines()[0][:160]}")
            continue
        result.validated.append(figures)
        if not figures.fits:
            _reject_unfit(result, f"{figures.layout}: XLA needs {figures.memory_bytes / 2 ** 30:.2f} GiB per device")
            continue
        fitting.append((e, figures))
        if len(fitting) == k:
            break
    if not fitting:
        raise ValueError(f"none of the {len(result.ranked)} best layouts of {result.model or 'the model'} fits "
                         f"the present devices once compiled: " + "; ".join(result.examples.values()))
    if measure is not None:
        fitting.sort(key=lambda pair: pair[1].measured_s)
    result.best = fitting[0][0]
    result.analytical = False
    return result
