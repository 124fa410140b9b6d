"""Planning on the present devices: layouts compiled, timed and calibrated, plans that train."""

import json
from dataclasses import asdict

import jax
import numpy as np
import pytest

from fax import load_config, models
from fax.cli import main
from fax.config import ConfigError
from fax.train.loop import Trainer
from fax.train.planning import layout_compiler, plan_here
from fax.parallel import ParallelConfig, planner, validation
from fax.parallel.calibrate import present_cluster
from fax.parallel.hardware import efficiency
from fax.parallel.hlo import COMPILED_HEADROOM


def tiny_config(*extra: str):
    return load_config(overrides=["model=gpt-tiny", "train.batch_size=16", "train.seq_len=64", *extra])


def test_present_plans_are_compiled_and_those_that_do_not_fit_are_rejected():
    result = plan_here(tiny_config(), jax.devices(), "gpt-tiny", validate=3)
    assert not result.analytical and len(result.validated) == 3 and all(c.fits for c in result.validated)
    assert result.best.candidate.describe() == result.validated[0].layout  # first fitting in predicted order
    assert all(c.memory_bytes > 0 and c.compile_s > 0 for c in result.validated)
    assert any(c.collectives for c in result.validated)  # sharded layouts communicate, and it is recorded
    needs = sorted({c.memory_bytes for c in result.validated})
    # A device that holds only the smallest of them: the others are rejected once compiled.
    small = planner.plan(models.preset("gpt-tiny"), present_cluster(), 16, 64, "gpt-tiny", top=50)
    small = validation.validate(small, layout_compiler(tiny_config(), jax.devices()),
                             hbm_bytes=needs[0] / COMPILED_HEADROOM, platform="cpu", k=1)
    assert all(c.memory_bytes <= needs[0] for c in small.validated if c.fits)
    assert small.rejected.get("out of memory (compiled)", 0) == sum(not c.fits for c in small.validated)
    with pytest.raises(ValueError, match=r"fits cpu-8 \(present\) once compiled, e.g. .*: XLA needs"):
        validation.validate(planner.plan(models.preset("gpt-tiny"), present_cluster(), 16, 64, top=2),
                         layout_compiler(tiny_config(), jax.devices()), hbm_bytes=1.0, platform="cpu")


def test_a_layout_that_runs_out_of_memory_compiling_is_rejected_not_fatal():
    # On a GPU, XLA's autotuner or the first step can run out of memory for a layout that the
    # estimate let through (seen on an H100); CPU devices never do, so the compiler says so here.
    compile_layout = layout_compiler(tiny_config(), jax.devices())
    result = planner.plan(models.preset("gpt-tiny"), present_cluster(), 16, 64, "gpt-tiny", top=5)
    first = result.ranked[0].candidate

    def compile_or_run_out(layout):
        if layout == first:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 50.15GiB")
        return compile_layout(layout)

    result = validation.validate(result, compile_or_run_out, hbm_bytes=2 ** 40, platform="cpu", k=1)
    assert result.best.candidate != first and result.validated[0].layout != first.describe()
    assert result.rejected["out of memory (compiled)"] == 1
    assert "50.15GiB" in result.examples["out of memory (compiled)"]

    def broken(layout):
        raise RuntimeError("INTERNAL: a compiler bug")
    with pytest.raises(RuntimeError, match="compiler bug"):  # anything else is not a verdict on the layout
        validation.validate(planner.plan(models.preset("gpt-tiny"), present_cluster(), 16, 64, top=2), broken, 2 ** 40,
                         "cpu")


def test_plan_auto_and_plan_files_train_end_to_end(tmp_path):
    trainer = Trainer(tiny_config("train.steps=4", "train.log_every=2", "train.sample_tokens=0",
                                  f"run_dir={tmp_path / 'auto'}"), plan="auto", echo=lambda _: None)
    picked = trainer.plan.best.candidate
    assert trainer.config.parallel == ParallelConfig(**picked.axes, tensor_sequence=picked.tensor_sequence,
                                                     virtual_stages=picked.virtual_stages, stage_remat=picked.stage_remat)
    assert trainer.config.train.microbatches == picked.microbatches and trainer.config.model.remat == picked.remat
    history = trainer.fit()
    trainer.close()
    assert json.loads((tmp_path / "auto" / "plan.json").read_text())["best"]["candidate"] == asdict(picked)
    assert all(np.isfinite(r["loss"]) for r in history)
    # A hand-written plan with two pipeline stages runs the pipelined step.
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"stages": 2, "fsdp": 4, "microbatches": 2}))
    piped = Trainer(tiny_config("train.steps=4", "train.log_every=2", "train.sample_tokens=0",
                                f"run_dir={tmp_path / 'piped'}", f"plan={path}"), echo=lambda _: None)
    assert piped.config.parallel == ParallelConfig(stage=2, data=1, fsdp=4, sequence=1, tensor=1)
    losses = [r["loss"] for r in piped.fit()]
    piped.close()
    np.testing.assert_allclose(losses, [r["loss"] for r in history], rtol=1e-4)  # same data, same model
    path.write_text(json.dumps({"stages": 2, "pipes": 4}))
    with pytest.raises(ConfigError, match=r"unknown layout keys \['pipes'\]"):
        Trainer(tiny_config(f"plan={path}"))


def test_plan_command_prints_a_table_and_json(capsys):
    assert main(["plan", "--model", "llama-7b", "--cluster", "v4-256", "--global-batch", "1024", "--seq", "2048",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "analytical: this cluster is not present" in out and "templates:" in out and "rejected:" in out
    assert main(["plan", "--model", "gpt-tiny", "--seq", "64", "--validate", "1", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "compiled for the present devices" in out and "pick: " in out
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-8", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["best"]["candidate"]["fsdp"] * parsed["best"]["candidate"]["data"] >= 1
    assert main(["plan", "--model", "llama-70b", "--cluster", "v4-8", "--global-batch", "64", "--seq", "4096"]) == 2


def test_plan_takes_what_train_takes_explains_its_pick_and_judges_one_layout(capsys):
    """`fax plan --model` took presets alone, and there was no way to ask about one layout."""
    # model=PRESET and model.* overrides reach the planner (4 layers: no 8-stage pipeline), as do train.*
    settings = ["model=llama-7b", "model.n_layers=4", "train.batch_size=64", "train.seq_len=2048"]
    assert main(["plan", *settings, "--cluster", "h100-64", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert (parsed["model"], parsed["global_batch"], parsed["seq_len"]) == ("llama-7b", 64, 2048)
    assert main(["plan", *settings[:1], *settings[2:], "--cluster", "h100-64", "--json"]) == 0
    assert parsed["best"]["step_s"] < 0.25 * json.loads(capsys.readouterr().out)["best"]["step_s"]  # 4 of 32 layers
    assert sum(parsed["breakdown"].values()) == pytest.approx(parsed["best"]["step_s"])
    assert parsed["alternatives"] and all(a["why"] for a in parsed["alternatives"])
    assert main(["plan", *settings, "--cluster", "h100-64", "--validate", "2"]) == 0
    out = capsys.readouterr().out
    assert "step: matmul compute" in out and "memory per device (GiB): params" in out
    assert "nearest alternatives:" in out and "x the pick's step time" in out
    assert "not compiled: no ahead-of-time compiler for H100 80GB SXM here" in out
    # one layout: its prediction and whether it fits; exit 1 when it cannot run, naming why
    assert main(["plan", *settings, "--cluster", "h100-64", "--layout", '{"fsdp": 32, "tensor": 2, "remat": "full"}']) == 0
    out = capsys.readouterr().out
    assert "fsdp=32 tensor=2, mb=1, remat=full on h100-64, batch 64 x 2048:" in out and out.rstrip().endswith("fits")
    assert main(["plan", *settings, "--cluster", "h100-64", "--layout", '{"fsdp": 4, "tensor": 8}', "--json"]) == 1
    judged = json.loads(capsys.readouterr().out)
    assert not judged["fits"] and judged["problems"] == ["its mesh has 32 devices, the cluster 64"]
    assert main(["plan", "model=llama-70b", "train.batch_size=64", "train.seq_len=4096", "--cluster", "h100-64",
                 "--layout", '{"fsdp": 64, "remat": "none"}']) == 1
    assert "DOES NOT RUN: needs" in capsys.readouterr().out
    # predicted at 92% of an H100: past the planner's 10% margin, within what its compiler allows
    assert main(["plan", "model=llama-7b", "model.n_layers=132", "train.batch_size=64", "train.seq_len=2048",
                 "--cluster", "h100-64", "--layout", '{"fsdp": 64}']) == 1
    assert "MAY NOT FIT: needs 73.5 GiB per device, above 72.0 GiB" in capsys.readouterr().out
    # the same memory with a mesh that is not the cluster's: it cannot run, whatever the compiler says
    assert main(["plan", "model=llama-7b", "model.n_layers=132", "train.batch_size=64", "train.seq_len=2048",
                 "--cluster", "h100-128", "--layout", '{"fsdp": 64}']) == 1
    assert "DOES NOT RUN: its mesh has 64 devices, the cluster 128" in capsys.readouterr().out
    assert main(["plan", *settings, "--cluster", "h100-64", "--layout", '{"pipes": 2}']) == 2
    assert "is not a readable layout" in capsys.readouterr().err


def test_calibration_measures_the_devices_and_the_planner_uses_it(tmp_path, monkeypatch):
    from fax.parallel.calibrate import calibrate, fit_knees, link_from_allreduce

    # The ring model inverted: times made from a known link give that link back.
    n, bandwidth, latency = 8, 3e9, 20e-6
    times = {b: 2 * (n - 1) / n * b / bandwidth + 2 * (n - 1) * latency for b in (4096, 2 ** 24)}
    assert link_from_allreduce(times, n) == pytest.approx((bandwidth, latency), rel=1e-6)
    # Likewise the efficiency curve: rates made with known knees give them back (to the grid's step).
    for knees in ((30.0, 10.0), (512.0, 128.0), (5000.0, 2000.0)):
        rates = {(r, c): 1e11 * efficiency(r, c, knees, 0.5) for r in (64, 256, 1024, 4096) for c in (16, 64, 256, 1024)}
        assert fit_knees(rates) == pytest.approx(knees, rel=0.07)
    monkeypatch.setenv("FAX_CACHE", str(tmp_path))
    nominal = present_cluster()
    profile = calibrate(jax.devices())
    assert profile["best_matmul_flops"] > 1e8 and profile["link_bandwidth"] > 0
    assert json.loads((tmp_path / "calibration" / "cpu-8.json").read_text())["devices"] == 8
    calibrated = present_cluster()
    assert "calibrated" in calibrated.name and calibrated.intra.bandwidth == profile["link_bandwidth"]
    # a send's fixed cost, timed apart: on XLA's CPU backend a rendezvous, dearer than a ring step
    assert calibrated.intra.send_latency == profile["permute_latency"] > profile["link_latency"]
    # MFU stays against the nominal peak; the measured ceiling is against it
    assert calibrated.device.peak_flops == nominal.device.peak_flops
    assert calibrated.device.matmul_ceiling != nominal.device.matmul_ceiling
    rates = {tuple(map(int, k.split("x"))): v for k, v in profile["matmul_flops"].items()}
    assert len(rates) == 16 and calibrated.device.knees == fit_knees(rates)
    # The fitted curve reproduces the best measured rate (per device, the emulated ones sharing the cores).
    best = max(rates, key=rates.get)
    d = calibrated.device
    assert d.peak_flops * efficiency(*best, d.knees, d.matmul_ceiling) == pytest.approx(rates[best])
    # A profile from an older fax (no version, square matmuls) is not trusted: datasheet figures and a warning.
    path = tmp_path / "calibration" / "cpu-8.json"
    path.write_text(json.dumps({"device_kind": "cpu", "devices": 8, "matmul_flops": {"1024": 5e10}}))
    with pytest.warns(UserWarning, match="re-run `fax plan --calibrate`"):
        stale = present_cluster()
    assert "calibrated" not in stale.name and stale.device == nominal.device
