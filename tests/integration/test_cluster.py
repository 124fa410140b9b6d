"""Ray mode: 2 emulated hosts x 4 CPU devices, one HostWorker actor and one JAX process each. The model is
a mixture of experts over expert=8: its tokens cross the hosts by all-to-all, its other params are
sharded over the axis as over fsdp."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from fax import Trainer, load_config  # noqa: E402
from fax.train import step as step_lib  # noqa: E402
from fax.checkpoint import Checkpointer  # noqa: E402
from fax.cluster import ClusterError  # noqa: E402
from fax.cluster.hosts import HostGroup, host_layout  # noqa: E402
from fax.serving.cluster_engine import ClusterEngine  # noqa: E402
from fax.config import ConfigError  # noqa: E402
from fax.data import Batch, Sampler, TokenDataset  # noqa: E402
from fax.metrics import read_metrics  # noqa: E402
from fax.cli.train import sample  # noqa: E402
from fax.serving.batching import complete, generate  # noqa: E402
from fax.serving.engine import Engine  # noqa: E402
from fax.serving.sampling import SamplingParams  # noqa: E402
from fax.serving.text import run_tokenizer  # noqa: E402
from fax.train.evaluate import evaluate_checkpoint  # noqa: E402
from fax.parallel import make_mesh  # noqa: E402

STEPS = 6
MODEL = ["model=gpt-tiny", "model.use_bias=false", "model.moe_experts=8", "parallel.expert=8", "parallel.fsdp=1"]


def settings(run_dir, corpus, *extra):
    return [*MODEL, f"run_dir={run_dir}", f"data.path={corpus}", "train.batch_size=8",
            "train.seq_len=32", "train.sample_tokens=0", "train.log_every=1", f"train.steps={STEPS}",
            "checkpoint.every_n_steps=2", "cluster.heartbeat_timeout_s=10", *extra]


def held_out(corpus):
    """Batches for an evaluation (training windows of another seed: the small corpus has no validation split)."""
    return [Sampler(TokenDataset.open(corpus), 8, 32, seed=1).batch(i) for i in range(2)]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def saved_params(run_dir, step):
    """A checkpoint's params, restored onto one device of this process."""
    cfg = load_config(overrides=[*MODEL[:3], "parallel.fsdp=1"])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    target = jax.eval_shape(training.init)["params"]
    return Checkpointer(str(run_dir / "checkpoints"), read_only=True).restore_params(
        step, target, training.state_shardings["params"])


def test_host_layout_pins_one_worker_per_host():
    def node(**resources):
        return {"Alive": True, "Resources": {"CPU": 96.0, **resources}}

    tpu = host_layout({"TPU": 16.0, "TPU-v4-32-head": 1.0}, [node(TPU=4.0) for _ in range(4)] + [node()], 0, 4)
    assert (tpu.kind, tpu.hosts, tpu.devices, tpu.strategy) == ("tpu", 4, 16, "STRICT_SPREAD")
    assert tpu.bundles == [{"TPU": 4, "TPU-v4-32-head": 1}] + [{"TPU": 4}] * 3  # worker 0 on the slice head
    gpu = host_layout({"GPU": 16.0}, [node(GPU=8.0), node(GPU=8.0), {"Alive": False, "Resources": {"GPU": 8.0}}], 0, 4)
    assert (gpu.kind, gpu.hosts, gpu.devices, gpu.bundles) == ("gpu", 2, 16, [{"GPU": 8}] * 2)
    emulated = host_layout({"CPU": 2.0, "fax_host": 2.0}, [node()], 0, 4)
    assert (emulated.kind, emulated.hosts, emulated.devices, emulated.strategy) == ("cpu", 2, 8, "PACK")
    plain = host_layout({"CPU": 192.0}, [node(), node()], 0, 2)
    assert (plain.kind, plain.hosts, plain.devices, plain.bundles) == ("node", 2, 4, [{"CPU": 1}] * 2)
    assert host_layout({"CPU": 2.0, "fax_host": 2.0}, [node()], 3, 4).hosts == 3  # asked for more than exist


@pytest.fixture(scope="module")
def ray_cluster(local_ray):
    """A local Ray cluster offering two emulated hosts."""
    with local_ray(2):
        yield


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("local")
    Trainer(load_config(overrides=settings(run_dir, small_corpus)), echo=lambda _: None).fit()
    return run_dir


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, small_corpus, ray_cluster):
    """The same run in Ray mode, and what its hosts reported (asked before the workers stop)."""
    run_dir = tmp_path_factory.mktemp("ray")
    with Trainer(load_config(overrides=settings(run_dir, small_corpus, "cluster.ray=true", "train.profile_from=3",
                                                "train.profile_steps=2")), echo=lambda _: None) as trainer:
        trainer.fit()
        runtime = trainer.runtime
        seen = runtime.group.call_all("the rows each host trained on", "last_rows")
        report = {"built": runtime.built, "rows": runtime.rows, "pids": runtime.worker_pids(), "seen": seen,
                  "eval": runtime.evaluate(held_out(small_corpus))}
        # `fax train --ray`'s end-of-run sample: a serving engine on the run's own hosts, before they stop
        report["sample"] = sample(trainer, "def ", 12)
    return report, run_dir


def test_bring_up_gives_each_host_its_rows(ray_run, small_corpus):
    report, _ = ray_run
    assert [b["devices"] for b in report["built"]] == [8, 8]
    assert [b["process_index"] for b in report["built"]] == [0, 1]
    assert [b["local_devices"] for b in report["built"]] == [4, 4]
    assert len(set(report["pids"])) == 2 and os.getpid() not in report["pids"]
    assert report["rows"] == [[(0, 4)], [(4, 8)]]  # the batch is sharded over expert=8: 4 devices' rows per host
    last_batch = Sampler(TokenDataset.open(small_corpus), 8, 32, seed=0).batch(STEPS - 1)
    seen = report["seen"]
    for host, rows in ((0, slice(0, 4)), (1, slice(4, 8))):
        for field in Batch._fields:
            np.testing.assert_array_equal(getattr(seen[host], field), getattr(last_batch, field)[rows])


def test_the_end_of_run_sample_on_the_hosts_is_the_local_engines(ray_run):
    report, run_dir = ray_run
    config = load_config(run_dir / "config.yaml")
    local = complete(Engine.from_run_dir(run_dir, max_batch=1), run_tokenizer(config), "def ", 12, seed=config.seed)
    assert report["sample"] == local and len(local) > len("def ")


def test_every_host_traces_the_profiled_steps(ray_run, traced_steps):
    _, run_dir = ray_run
    assert [traced_steps(run_dir / "profile" / f"host{i}") for i in range(2)] == [(2, [3, 4])] * 2


def test_ray_mode_matches_local_mode(ray_run, local_run, small_corpus):
    report, ray_dir = ray_run
    local, remote = losses(local_run), losses(ray_dir)
    assert sorted(remote) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([remote[s] for s in sorted(local)], [local[s] for s in sorted(local)], rtol=1e-5)
    # The hosts' evaluation of the final params equals one process's evaluation of the local run's.
    cfg = load_config(overrides=settings(local_run, small_corpus, "parallel.expert=1"))
    training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    params = saved_params(local_run, STEPS)
    alone = np.mean([float(training.evaluate(params, batch)) for batch in held_out(small_corpus)])
    assert report["eval"] == pytest.approx(alone, rel=1e-5)


def test_killed_worker_restarts_and_finishes_bit_exact(ray_run, tmp_path, small_corpus):
    _, reference_dir = ray_run
    messages = []
    trainer = Trainer(load_config(overrides=settings(tmp_path, small_corpus, "cluster.ray=true")),
                      echo=messages.append)
    killed = []

    def kill_worker_once(step, _):
        if not killed:
            killed.append(trainer.runtime.worker_pids()[1])
            os.kill(killed[0], signal.SIGKILL)

    trainer.add_hook(3, kill_worker_once)
    with trainer:
        trainer.fit()
    assert killed and len(trainer.restarts) == 1 and "host worker 1 died" in trainer.restarts[0]
    assert any(m.startswith("fax: restart 1/3: a train step: host worker 1 died") for m in messages), messages
    assert "fax: resumed from the checkpoint of step 2" in messages
    assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))
    for ours, theirs in zip(jax.tree.leaves(saved_params(tmp_path, STEPS)),
                            jax.tree.leaves(saved_params(reference_dir, STEPS))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_checkpoints_move_between_ray_and_local_mode(ray_run, local_run, tmp_path, small_corpus):
    _, ray_dir = ray_run
    shutil.copytree(ray_dir, tmp_path / "to_local", ignore=shutil.ignore_patterns("ray"))
    shutil.copytree(local_run, tmp_path / "to_ray")
    more = [f"train.steps={STEPS + 2}"]
    messages = []
    Trainer(load_config(overrides=settings(tmp_path / "to_local", small_corpus, *more)), echo=messages.append).fit()
    assert f"fax: resumed from the checkpoint of step {STEPS}" in messages
    # The other way through the command line, which starts its own local cluster of 2 emulated hosts.
    cli = [sys.executable, "-m", "fax.cli", "train", "--emulate-hosts", "2", "--devices-per-host", "4",
           *settings(tmp_path / "to_ray", small_corpus, *more, "cluster.ray_temp_dir=" + tempfile.mkdtemp(dir="/tmp"))]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fax: resumed from the checkpoint of step {STEPS}" in proc.stdout
    assert "fax: 2 host workers joined (8 cpu devices" in proc.stdout
    to_local, to_ray = losses(tmp_path / "to_local"), losses(tmp_path / "to_ray")
    for step in (STEPS + 1, STEPS + 2):
        np.testing.assert_allclose(to_ray[step], to_local[step], rtol=1e-5)


def test_a_host_that_never_joins_is_a_clear_error(ray_cluster, tmp_path, small_corpus):
    cfg = load_config(overrides=settings(tmp_path, small_corpus, "cluster.ray=true", "cluster.hosts=3",
                                         "cluster.startup_timeout_s=5", "parallel.data=3", "parallel.fsdp=4", "parallel.expert=1",
                                         "train.batch_size=12"))
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"could not place 3 host workers of \{'fax_host': 1\} each within "
                                           r"cluster.startup_timeout_s=5s"):
        Trainer(cfg, echo=lambda _: None).fit()
    assert time.monotonic() - started < 60
    assert ray.available_resources().get("fax_host") == 2  # nothing left reserved


def test_eval_on_two_hosts_gives_what_one_process_does(ray_cluster, local_run):
    """`fax eval --ray`: the hosts restore their shards of the params and score the head's batches
    (9: sent in groups of 4, 4 and 1)."""
    said = []
    step, loss = evaluate_checkpoint(local_run, ["cluster.ray=true", "train.eval_batches=9"], split="train",
                                     echo=said.append)
    assert step == STEPS and any("2 host workers joined (8 cpu devices" in line for line in said), said
    assert loss == pytest.approx(evaluate_checkpoint(local_run, ["train.eval_batches=9"], split="train")[1], rel=1e-6)
    with pytest.raises(ConfigError, match=rf"has no complete checkpoint of step 5; choose one of steps \[2, 4, {STEPS}\]"):
        evaluate_checkpoint(local_run, ["cluster.ray=true"], step=5)  # refused before any host starts


def test_engine_on_two_hosts_generates_what_one_process_does(ray_cluster, local_run):
    """Serving a model over the host workers' global mesh: the same tokens as the local engine."""
    config = load_config(local_run / "config.yaml", [f"run_dir={local_run}", "cluster.ray=true"])
    engine = ClusterEngine(HostGroup(config, echo=lambda _: None), str(local_run), None, max_batch=4)
    try:
        assert engine.step == STEPS
        hot = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=5)
        prompts = [[5, 17, 99, 3], [7] * 9, [1, 2]]
        penalized = SamplingParams(max_new_tokens=10, temperature=0.0, frequency_penalty=1.0, logit_bias=((3, 2.0),))
        sampling = [hot, penalized, dataclasses.replace(hot, seed=6)]
        local = Engine.from_run_dir(local_run, max_batch=4)
        assert generate(engine, prompts, sampling) == generate(local, prompts, sampling)
        for got, expected in zip(engine.score(prompts[0] + prompts[1]), local.score(prompts[0] + prompts[1])):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # logprobs
    finally:
        engine.close()
    deadline = time.monotonic() + 30  # the placement group is released asynchronously
    while ray.available_resources().get("fax_host") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("fax_host") == 2


def test_a_local_cluster_listens_on_loopback_only_and_dies_with_its_killed_head(tmp_path, small_corpus):
    """`fax train --emulate-hosts 2` starts Ray itself. Its services listened on every interface, its
    folders were world-writable, and after kill -9 of the head Ray's agents lived on (60 s and more).
    Now every listening socket is on 127.0.0.1, the files are private, and within seconds of the
    kill no process the head started is left."""
    import psutil

    folder = tempfile.mkdtemp(dir="/tmp")
    cli = [sys.executable, "-m", "fax.cli", "train", "--emulate-hosts", "2", "--devices-per-host", "4",
           *settings(tmp_path, small_corpus, "train.steps=100000", f"cluster.ray_temp_dir={folder}")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with (tmp_path / "train.log").open("w") as log:
        head = subprocess.Popen(cli, env=env, stdout=log, stderr=subprocess.STDOUT)
    started: list = []
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() and time.monotonic() < deadline and head.poll() is None:
            time.sleep(1)
        assert (tmp_path / "metrics.jsonl").exists(), (tmp_path / "train.log").read_text()[-3000:]
        started = psutil.Process(head.pid).children(recursive=True)
        assert {"gcs_server", "raylet"} <= {p.name() for p in started}
        listening = {(p.name(), c.laddr.ip) for p in started for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening
        assert os.stat(folder).st_mode & 0o077 == 0
        head.send_signal(signal.SIGKILL)
        head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started) and time.monotonic() < deadline:
            time.sleep(1)
        assert [p.name() for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        for p in started + [psutil.Process(head.pid)] if head.poll() is None else started:
            if p.is_running():
                p.kill()
