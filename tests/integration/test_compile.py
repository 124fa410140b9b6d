"""``fax compile``: the train step compiled ahead of time by XLA's TPU compiler (libtpu) for slices
that are not here, and for the present devices; what does not fit exits 1, bad settings exit 2."""

import json
import os
import re
import subprocess
import sys

import pytest


def fax(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "fax.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_a_tpu_slice_compiles_and_reports_memory_and_collectives_by_axis():
    # a mixture of experts: tokens reach their experts by all-to-all, the rest of the params are gathered
    # over the expert axis as over fsdp, each expert's MLP split over tensor (axes of sizes told apart);
    # a dense first block, then a group of a dense block and a mixture
    done = fax("compile", "model=llama-tiny", "model.moe_experts=8", "model.n_layers=3", "model.moe_first_dense=1",
               "model.moe_every=2", "train.batch_size=32", "parallel.fsdp=1", "parallel.expert=8", "parallel.tensor=2",
               "--cluster", "v5e-16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "v5e-16: 16 x TPU v5 lite, mesh expert=8 x tensor=2, 32 x 128 tokens/step" in done.stdout
    assert "of 16 GiB (fits)" in done.stdout
    assert "all-gather over expert" in done.stdout and "all-reduce over tensor" in done.stdout
    assert "all-to-all over expert" in done.stdout
    assert "reduce-scatter over expert" in done.stdout  # the gathered params' gradients (XLA:TPU's fusion)


def test_a_step_that_does_not_fit_exits_1_with_the_compilers_reason():
    done = fax("compile", "model=llama-7b", "model.dtype=bfloat16", "train.batch_size=8", "train.seq_len=512",
               "model.remat=full", "--cluster", "v5e-4")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "DOES NOT FIT" in done.stdout and "exceeds available HBM" in done.stdout


def test_a_tpu_step_fits_by_the_compilers_peak_though_its_buffers_add_up_to_more_than_the_chip():
    # XLA:TPU holds the peak of its heap simulation against HBM; arguments and temporaries summed count
    # buffers that are never live at once (here 16.9 GiB on a 16 GiB chip, which XLA compiles)
    done = fax("compile", "model=llama-7b", "model.dtype=bfloat16", "model.remat=full", "train.batch_size=8",
               "train.seq_len=3072", "model.max_seq_len=4096", "--cluster", "v5e-8")
    assert done.returncode == 0 and "(fits)" in done.stdout, done.stdout + done.stderr[-3000:]
    figures = {k: float(v) for k, v in re.findall(r"(arguments|temporaries|needed) ([\d.]+) ", done.stdout)}
    assert figures["arguments"] + figures["temporaries"] > 16 > figures["needed"] > figures["arguments"]


@pytest.mark.parametrize(("args", "message"), [
    (["model=llama-tiny", "parallel.tensor=3", "--cluster", "v5e-16"], "parallel.tensor"),
    (["--cluster", "h100-8"], "ahead-of-time compilation is for TPU slices"),
    (["--cluster", "v5p-6"], "not a TPU slice size"),
])
def test_bad_targets_and_settings_are_named_before_compiling(args, message):
    done = fax("compile", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_the_present_devices_compile_through_the_local_backend():
    done = fax("--cpu-devices", "4", "compile", "model=gpt-tiny", "train.batch_size=8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cpu-4 (present): 4 x cpu, mesh fsdp=4" in done.stdout and "(fits)" in done.stdout


FLASH_PROBE = """
import json, jax
from fax.checkpoint import abstract_like
from fax.config import load_config
from fax.parallel import make_mesh
from fax.train import step as step_lib
from fax.train.aot import target_devices

devices, _, _ = target_devices("v5e-4")
figures = {}
for impl in ("xla", "auto"):
    cfg = load_config(overrides=["model=llama-tiny", "model.dtype=bfloat16", "train.batch_size=8", "train.seq_len=512",
                                 "model.max_seq_len=512", f"model.attention_impl={impl}"])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
    state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
    compiled = step_lib.compile_step(training, state, (8, 513))
    figures[impl] = compiled.memory_analysis().temp_size_in_bytes, compiled.as_text().count("tpu_custom_call")
print(json.dumps(figures))
"""


def test_on_tpu_auto_attention_is_the_pallas_flash_kernel_and_holds_no_scores():
    """The train step compiled for a TPU slice: with attention_impl=auto the Pallas kernel's custom
    calls are in the program (forward and backward) and the scratch memory is XLA attention's fraction.
    (In a process of its own: one process at a time may hold the TPU compiler.)"""
    done = subprocess.run([sys.executable, "-c", FLASH_PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["xla"][1] == 0 and figures["auto"][1] >= 2, figures
    assert figures["auto"][0] < 0.5 * figures["xla"][0], figures


EXPERT_FLOPS_PROBE = """
import json, jax
from fax.checkpoint import abstract_like
from fax.config import load_config
from fax.parallel import make_mesh
from fax.train import step as step_lib
from fax.train.aot import target_devices

devices, _, _ = target_devices("v5e-4")
flops = {}
for name, extra in (("dense", []), ("dropless", ["model.moe_experts=8", "model.moe_d_ff=128"])):
    cfg = load_config(overrides=["model=llama-tiny", "model.dtype=bfloat16", "train.batch_size=8", *extra])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, devices))
    state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
    flops[name] = step_lib.compile_step(training, state, (8, cfg.seq_len + 1)).cost_analysis()["flops"]
print(json.dumps(flops))
"""


def test_on_tpu_a_dropless_mixture_computes_its_active_flops():
    """Top-2 of 8 experts of half the dense MLP's width: the same active FLOPs as the dense model. XLA's
    TPU lowering of ragged_dot computed the experts' weight gradient for every expert on every row
    (1.9x the dense step's FLOPs in all); the grouped-matmul kernels compute the rows each expert has."""
    done = subprocess.run([sys.executable, "-c", EXPERT_FLOPS_PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    flops = json.loads(done.stdout.strip().splitlines()[-1])
    assert flops["dropless"] < 1.1 * flops["dense"], flops


def test_plan_validates_its_top_layouts_by_compiling_them_for_a_tpu_slice():
    """`fax plan --cluster v5p-512 --validate K` had no compiler behind it: the top layouts are now
    compiled for the slice's real topology and XLA's memory is reported beside the prediction."""
    done = fax("plan", "model=llama-tiny", "model.dtype=bfloat16", "train.batch_size=32", "--cluster", "v5e-16",
               "--validate", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout)
    assert not parsed["analytical"] and len(parsed["validated"]) >= 2
    for compiled in parsed["validated"]:
        assert compiled["memory_bytes"] > 0 and compiled["compile_s"] > 0 and compiled["collectives"]
    from fax.parallel.layout import Candidate

    first_fitting = next(c for c in parsed["validated"] if c["fits"])
    assert Candidate(**parsed["best"]["candidate"]).describe() == first_fitting["layout"]
