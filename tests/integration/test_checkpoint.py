"""Checkpoints: bit-exact resume, restore onto any mesh, crash- and preemption-safety, keep policy."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fax import ConfigError, Trainer, apply_overrides, load_config
from fax.checkpoint import TMP_MARKER, Checkpointer
from fax.parallel import make_mesh
from fax.train import step as step_lib
from fax.cli import main as cli_main
from fax.config import CheckpointConfig
from fax.metrics import read_metrics


def overrides(run_dir, corpus, *extra):
    return ["model=gpt-tiny", f"run_dir={run_dir}", f"data.path={corpus}", "train.batch_size=16",
            "train.seq_len=32", "train.sample_tokens=0", "train.log_every=1", *extra]


def quiet(cfg, devices=None, messages=None):
    return Trainer(cfg, devices=devices, echo=(messages.append if messages is not None else lambda _: None))


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_is_bit_exact(tmp_path, small_corpus):
    straight = quiet(load_config(overrides=overrides(tmp_path / "a", small_corpus, "train.steps=8")))
    straight.fit()
    cfg = load_config(overrides=overrides(tmp_path / "b", small_corpus, "train.steps=8"))
    quiet(cfg).fit(until_step=4)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as log:
        log.write('{"step": 5, "loss": 4.')  # a record cut short by a crash: no hindrance to resuming
    messages = []
    resumed = quiet(cfg, messages=messages)
    resumed.fit()
    assert "fax: resumed from the checkpoint of step 4" in messages
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert [s for s, _ in losses(tmp_path / "b")] == list(range(1, 9))
    assert_trees_equal(resumed.state["params"], straight.state["params"])
    assert_trees_equal(resumed.state["opt_state"], straight.state["opt_state"])


def test_restore_onto_other_meshes(tmp_path, small_corpus):
    base = overrides(tmp_path / "saved", small_corpus, "train.steps=5", "parallel.data=2", "parallel.fsdp=2",
                     "parallel.tensor=2")
    saver = quiet(load_config(overrides=base))
    saver.fit(until_step=4)
    saved_params = jax.device_get(saver.state["params"])

    def continue_on(name, mesh, devices):
        shutil.copytree(tmp_path / "saved", tmp_path / name)
        data, fsdp, tensor = mesh
        cfg = load_config(overrides=[*base, f"run_dir={tmp_path / name}", f"parallel.data={data}",
                                     f"parallel.fsdp={fsdp}", f"parallel.tensor={tensor}"])
        trainer = quiet(cfg, devices=devices)
        history = trainer.fit()
        return trainer, history[-1]

    _, reference = continue_on("same", (2, 2, 2), jax.devices())
    for name, mesh, devices in [("dp8", (8, 1, 1), jax.devices()), ("tp8", (1, 1, 8), jax.devices()),
                                ("four", (2, 1, 2), jax.devices()[:4]), ("one", (1, 1, 1), jax.devices()[:1])]:
        ckpt = Checkpointer(str(tmp_path / "saved" / "checkpoints"))
        trainer, record = continue_on(name, mesh, devices)
        restored = ckpt.restore_params(4, saved_params, trainer.training.state_shardings["params"])
        assert jax.tree.leaves(restored)[0].sharding.mesh.devices.size == len(devices)
        assert_trees_equal(restored, saved_params)
        assert record["step"] == 5
        np.testing.assert_allclose(record["loss"], reference["loss"], rtol=1e-5, err_msg=name)


def test_keep_policy(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(max_to_keep=3, keep_every_n_steps=5, async_save=True))
    state = {"params": {"w": np.arange(4.0)}, "opt_state": {"m": np.zeros(4)}}
    for step in range(1, 11):
        ckpt.save(state, {"step": step})
    ckpt.wait()
    assert ckpt.steps() == [5, 8, 9, 10]
    ckpt.close()


def test_compressed_and_raw_checkpoints_restore_the_same_arrays(tmp_path):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # replicated over 8 devices
    state = {"params": {"w": jax.device_put(np.random.default_rng(0).normal(size=(64, 256)), sharded),
                        "b": jax.device_put(np.arange(256.0), whole)},
             "opt_state": {"m": jax.device_put(np.zeros((64, 256)), sharded)}}
    shardings = {**jax.tree.map(lambda x: x.sharding, state), "step": whole}
    sizes = {}
    for compress in (False, True):
        ckpt = Checkpointer(str(tmp_path / str(compress)), CheckpointConfig(compress=compress))
        ckpt.save(state, {"step": 1}, wait=True)
        restored, _ = ckpt.restore(1, state, shardings)
        assert_trees_equal({k: restored[k] for k in state}, state)
        assert restored["params"]["b"].sharding == whole
        sizes[compress] = ckpt.size_bytes(1)
        ckpt.close()
    assert sizes[True] < sizes[False] - 64 * 256 * 8 / 2  # the zeros compress away


def test_resume_refuses_a_different_model_and_resume_false(tmp_path, small_corpus):
    cfg = load_config(overrides=overrides(tmp_path, small_corpus, "train.steps=2"))
    quiet(cfg).fit()
    with pytest.raises(ConfigError, match=r"model differs: model.d_model \(saved 64, now 128\); model.n_layers \(saved 2, now 3\)"):
        quiet(apply_overrides(cfg, ["model.d_model=128", "model.n_layers=3"]))
    with pytest.raises(ConfigError, match="holds checkpoints .latest step 2. but resume=false"):
        quiet(apply_overrides(cfg, ["resume=false"]))
    quiet(apply_overrides(cfg, ["model.remat=full", "parallel.tensor=2", "train.steps=3"])).fit()  # compute-only


CRASH_DURING_SAVE = """
import os, signal, sys, time
import jax
jax.config.update("jax_num_cpu_devices", 8)
from pathlib import Path
from fax import Trainer
from fax.checkpoint import TMP_MARKER, Checkpointer

trainer = Trainer(overrides=sys.argv[1:], echo=lambda _: None)
folder = Path(trainer.config.run_dir) / "checkpoints"
save = Checkpointer.save

def save_then_die(self, state, meta, wait=False):
    save(self, state, meta, wait)
    if meta["step"] == 4:  # the save of step 4 is in flight: die while its folder is still temporary
        deadline = time.time() + 60
        while time.time() < deadline and not any(TMP_MARKER in p.name for p in folder.iterdir()):
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)

Checkpointer.save = save_then_die
trainer.fit()
"""


def test_killed_during_async_save_resumes_from_the_previous_step(tmp_path, small_corpus):
    # A big embedding makes the save long enough to be caught half-written.
    args = overrides(tmp_path, small_corpus, "train.steps=6", "checkpoint.every_n_steps=2",
                     "model.vocab_size=131072", "train.batch_size=8")
    proc = subprocess.run([sys.executable, "-c", CRASH_DURING_SAVE, *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = [p.name for p in (tmp_path / "checkpoints").iterdir() if TMP_MARKER in p.name]
    assert partial and partial[0].startswith("4")
    messages = []
    trainer = quiet(load_config(overrides=args), messages=messages)
    assert trainer.resume_step == 2
    trainer.fit(until_step=3)
    assert any("ignoring incomplete checkpoint 4" in m for m in messages), messages
    assert "fax: resumed from the checkpoint of step 2" in messages
    assert partial[0] in os.listdir(tmp_path / "checkpoints")  # reported, never deleted silently


def test_sigterm_saves_and_exits_with_resume_hint(tmp_path, small_corpus):
    args = overrides(tmp_path, small_corpus, "train.steps=100000", "checkpoint.every_n_steps=0",
                     "train.log_every=5")
    code = "import sys; from fax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists() or \
            not (tmp_path / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "a checkpoint of that step is saved. Resume with: fax train --config" in err
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    stopped = ckpt.latest_step()
    assert stopped and stopped >= 5
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] <= stopped
    messages = []
    quiet(load_config(overrides=[*args, f"train.steps={stopped + 2}"]), messages=messages).fit()
    assert f"fax: resumed from the checkpoint of step {stopped}" in messages
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == stopped + 2


def test_checkpoint_cli_lists_and_describes(tmp_path, small_corpus):
    quiet(load_config(overrides=overrides(tmp_path, small_corpus, "train.steps=4",
                                          "checkpoint.every_n_steps=2"))).fit()
    run = lambda *a: subprocess.run([sys.executable, "-m", "fax.cli", "checkpoint", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    ls = run("ls", str(tmp_path))
    assert ls.returncode == 0, ls.stderr
    rows = [line.split() for line in ls.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["2", "4"] and all(r[-1] == "fsdp=8" for r in rows)
    info = run("info", str(tmp_path), "2")
    assert info.returncode == 0, info.stderr
    assert "step 2" in info.stdout and "['blocks']['attn']['wq']" in info.stdout and "(2, 64, 8, 8)" in info.stdout
    missing = run("info", str(tmp_path), "3")
    assert missing.returncode == 2 and "no complete checkpoint of step 3; choose one of steps [2, 4]" in missing.stderr


def test_a_step_whose_checkpoint_appeared_meanwhile_is_kept_not_a_crash(tmp_path):
    """Recovery: the restarted run resumed from an earlier step while the old workers' save of a later
    step completed; reaching that step again must not fail with orbax's StepAlreadyExistsError."""
    cfg = load_config(overrides=["model=gpt-tiny"])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    state = training.init()
    meta = {"step": 3, "config": cfg.to_dict()}
    old = Checkpointer(str(tmp_path / "checkpoints"))
    old.save(state, meta, wait=True)
    resumed = Checkpointer(str(tmp_path / "checkpoints"))  # the restarted run, restored from step 1 or 2
    assert resumed.save(state, meta, wait=True) is False  # kept, nothing written
    restored, saved_meta = Checkpointer(str(tmp_path / "checkpoints"), read_only=True).restore(
        3, jax.eval_shape(training.init), training.state_shardings)
    assert saved_meta["step"] == 3
    jax.tree.map(np.testing.assert_array_equal, restored["params"], state["params"])
    old.close()
    resumed.close()


def damage_in_place(folder):
    """Flip 4 KiB in the middle of the largest file under ``folder`` (an array's data), keeping its size."""
    target = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    target.write_bytes(bytes(data))
    return target


def test_a_damaged_latest_checkpoint_is_named_and_the_run_falls_back(tmp_path, small_corpus, capsys):
    """Array data damaged in place in the latest step: restore's checksums catch it (before them, the run
    resumed on the damaged weights), the run says so and resumes from the previous intact step, exactly."""
    straight = tmp_path / "straight"
    quiet(load_config(overrides=overrides(straight, small_corpus, "train.steps=6"))).fit()
    run = tmp_path / "run"
    cfg = load_config(overrides=overrides(run, small_corpus, "train.steps=6", "checkpoint.every_n_steps=2"))
    quiet(cfg).fit(until_step=4)
    damage_in_place(run / "checkpoints" / "4" / "params")
    capsys.readouterr()
    assert cli_main(["checkpoint", "verify", str(run)]) == 1
    report = capsys.readouterr().out.splitlines()
    assert report[0] == "step 2: intact"
    assert report[1].startswith("step 4: DAMAGED: params arrays read back differ from those written: ")
    assert report[2] == "1 of 2 checkpoints intact"
    strict = load_config(overrides=overrides(run, small_corpus, "train.steps=6", "checkpoint.fallback=false"))
    with pytest.raises(ConfigError, match=r"the checkpoint of step 4 is damaged: params arrays read back differ"):
        quiet(strict).fit()
    messages = []
    quiet(cfg, messages=messages).fit()
    assert any(m.startswith("fax: the checkpoint of step 4 is damaged") and "resuming from the checkpoint of step 2"
               in m for m in messages), messages
    losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl")}  # noqa: E731
    assert losses(run)[6] == losses(straight)[6]


def test_damaged_metadata_and_missing_files_are_reported_not_tracebacks(tmp_path, small_corpus, capsys):
    run = tmp_path / "run"
    cfg = load_config(overrides=overrides(run, small_corpus, "train.steps=4", "checkpoint.every_n_steps=2"))
    quiet(cfg).fit()
    (run / "checkpoints" / "4" / "meta" / "metadata").write_text('{"step": 4, "config"')  # JSON cut short
    shutil.rmtree(run / "checkpoints" / "2" / "opt_state")
    capsys.readouterr()
    assert cli_main(["checkpoint", "ls", str(run)]) == 0
    listed = capsys.readouterr().out
    assert "DAMAGED" in listed.splitlines()[-1] and "4" in listed.splitlines()[-1]
    assert cli_main(["checkpoint", "info", str(run), "4"]) == 2
    assert "fax: error: the checkpoint of step 4 is damaged" in capsys.readouterr().err
    assert cli_main(["checkpoint", "verify", str(run), "2"]) == 1
    assert "step 2: DAMAGED" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"step 2 is damaged.*no intact checkpoint is left"):
        quiet(load_config(overrides=overrides(run, small_corpus, "train.steps=6"))).fit()


def sigterm_once_started(tmp_path, args):
    """``fax train`` in a subprocess, sent SIGTERM as soon as it has written the run's config (it then
    builds, restores and compiles: start-up); its exit status and output."""
    (tmp_path / "config.yaml").unlink(missing_ok=True)
    code = "import sys; from fax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "config.yaml").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert "Fatal Python error" not in err and "Traceback" not in err, err
    return proc.returncode, out + err


def test_sigterm_during_start_up_ends_cleanly(tmp_path, small_corpus):
    """A scheduler's SIGTERM while the run restores and compiles: a clean exit with a line saying what
    stands (130 before any checkpoint, 75 with one), no crash."""
    args = overrides(tmp_path, small_corpus, "train.steps=100000", "checkpoint.every_n_steps=0")
    code, err = sigterm_once_started(tmp_path, args)
    assert code == 130 and "stopped by a signal during start-up, before the first step" in err, err
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()
    quiet(load_config(overrides=[*args, "train.steps=2"])).fit()
    code, err = sigterm_once_started(tmp_path, [*args, "train.steps=5"])
    assert code == 75 and "stopped by a signal at step 2; a checkpoint of that step is saved" in err, err
