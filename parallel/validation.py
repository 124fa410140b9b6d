"""The planner's ranked layouts compiled for the devices they are for (present ones, or a TPU slice ahead
of time): XLA's memory beside the prediction, those XLA says do not fit rejected and counted, the
pick the first that fits (or with a timer, the fastest measured)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from fax.parallel.cost import Estimate
from fax.parallel.hlo import COLLECTIVES, fits_device, memory_needed
from fax.parallel.layout import Candidate
from fax.parallel.planner import Compiled, Plan, alternatives

COMPILED_OUT_OF_MEMORY = "out of memory (compiled)"


def compiled_figures(e: Estimate, compiled: Any, compile_s: float, hbm_bytes: float, platform: str) -> Compiled:
    used = memory_needed(compiled.memory_analysis(), platform)
    hlo = compiled.as_text()
    ops = {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES}
    return Compiled(e.candidate.describe(), e.step_s, e.memory_bytes, used, fits_device(used, hbm_bytes, platform),
                    float((compiled.cost_analysis() or {}).get("flops", 0.0)), {k: v for k, v in ops.items() if v},
                    compile_s)


def out_of_memory(error: BaseException) -> bool:
    """Whether an XLA error says a device ran out of memory (compiling, autotuning or running)."""
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def _reject_unfit(result: Plan, example: str) -> None:
    result.rejected[COMPILED_OUT_OF_MEMORY] = result.rejected.get(COMPILED_OUT_OF_MEMORY, 0) + 1
    result.examples.setdefault(COMPILED_OUT_OF_MEMORY, example)


def validate(result: Plan, compile_candidate: Callable[[Candidate], Any], hbm_bytes: float, platform: str, k: int = 3,
             measure: Callable[[Candidate], float] | None = None) -> Plan:
    """Compile the ranked candidates for devices of ``platform`` until ``k`` fit (or the list ends); those
    that do not fit are rejected. The pick is the first that fits, or with ``measure`` the fastest
    measured. Predicted and compiled figures are recorded side by side."""
    fitting: list[tuple[Estimate, Compiled]] = []
    for e in result.ranked:
        started = time.perf_counter()
        try:
            compiled = compile_candidate(e.candidate)
            figures = compiled_figures(e, compiled, time.perf_counter() - started, hbm_bytes, platform)
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
                         f"{result.cluster} once compiled, e.g. {result.examples[COMPILED_OUT_OF_MEMORY]}")
    if measure is not None:
        fitting.sort(key=lambda pair: pair[1].measured_s)
    if result.best is not fitting[0][0]:
        result.best = fitting[0][0]
        result.alternatives = alternatives(result.best, [e for e in result.ranked if e is not result.best])
    result.analytical = False
    return result
