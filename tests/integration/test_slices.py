"""Many slices (parallel.dcn_*): meshes whose outer axes span slices, and Ray mode placing a group of
hosts per slice (4 emulated hosts x 2 CPU devices as 2 slices)."""

import numpy as np
import pytest

from fax import Trainer, load_config
from fax.cluster import ClusterError
from fax.config import ConfigError, validate
from fax.metrics import read_metrics
from fax.parallel import ParallelConfig, make_mesh

ray = pytest.importorskip("ray")

from fax.cluster.hosts import host_layout  # noqa: E402


def test_an_axis_over_slices_takes_its_outer_share_across_them():
    mesh = make_mesh(ParallelConfig(stage=2, fsdp=4, dcn_fsdp=2))  # slice 0: devices 0-3, slice 1: 4-7
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 4)  # [stage, fsdp]
    np.testing.assert_array_equal(ids, [[0, 1, 4, 5], [2, 3, 6, 7]])
    mesh = make_mesh(ParallelConfig(data=2, fsdp=4, dcn_data=2))
    assert [{d.id // 4 for d in row.flat} for row in mesh.devices.reshape(2, 4)] == [{0}, {1}]  # a slice per replica


def test_slice_settings_that_do_not_divide_are_refused():
    with pytest.raises(ConfigError, match=r"parallel.dcn_data=3 must be a positive divisor of parallel.data=2"):
        validate(load_config(overrides=["parallel.data=2", "parallel.dcn_data=3"]), 8)
    with pytest.raises(ConfigError, match=r"parallel.dcn_fsdp=0 must be a positive divisor"):
        validate(load_config(overrides=["parallel.dcn_fsdp=0"]), 8)


def test_tpu_hosts_are_placed_slice_by_slice():
    def tpu_host(name, worker):
        resources = {"CPU": 96.0, "TPU": 4.0, name: 1.0, **({"TPU-v5p-16-head": 1.0} if worker == 0 else {})}
        return {"Alive": True, "Resources": resources, "Labels": {"ray.io/tpu-slice-name": name}}

    nodes = [tpu_host(name, w) for name in ("slice-b", "slice-a", "slice-c") for w in range(2)]
    layout = host_layout({"TPU": 24.0, "TPU-v5p-16-head": 3.0}, nodes, 4, 4, slices=2)
    head = {"TPU-v5p-16-head": 1.0}
    assert layout.bundles == [{"TPU": 4, "slice-a": 1, **head}, {"TPU": 4, "slice-a": 1},
                              {"TPU": 4, "slice-b": 1, **head}, {"TPU": 4, "slice-b": 1}]
    with pytest.raises(ClusterError, match=r"4 TPU slices of 1 hosts; the cluster has 3"):
        host_layout({"TPU": 24.0}, nodes, 4, 4, slices=4)


@pytest.fixture(scope="module")
def four_hosts(local_ray):
    with local_ray(4):
        yield


def test_two_slices_of_two_hosts_train_as_one_process_does(four_hosts, tmp_path, small_corpus):
    settings = ["model=gpt-tiny", f"data.path={small_corpus}", "train.batch_size=8", "train.seq_len=32",
                "train.sample_tokens=0", "train.log_every=1", "train.steps=4", "checkpoint.every_n_steps=0",
                "parallel.data=2", "parallel.fsdp=4", "cluster.heartbeat_timeout_s=10"]
    alone = tmp_path / "alone"
    Trainer(load_config(overrides=[*settings, f"run_dir={alone}"]), echo=lambda _: None).fit()
    sliced = tmp_path / "sliced"
    with Trainer(load_config(overrides=[*settings, f"run_dir={sliced}", "parallel.dcn_data=2", "cluster.ray=true",
                                        "cluster.devices_per_host=2"]), echo=lambda _: None) as trainer:
        trainer.fit()
        rows = trainer.runtime.rows
    # Each slice (hosts 0-1, hosts 2-3) holds one data replica: half the batch, split over its 4 devices.
    assert sorted(r for host in rows[:2] for r in host) == [(0, 2), (2, 4)]
    assert sorted(r for host in rows[2:] for r in host) == [(4, 6), (6, 8)]
    want = {r["step"]: r["loss"] for r in read_metrics(alone / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(sliced / "metrics.jsonl")}
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5)


def test_more_slices_than_hosts_is_a_clear_error(four_hosts, tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "parallel.data=8", "parallel.fsdp=1", "parallel.dcn_data=8",
                                 "cluster.ray=true", "cluster.devices_per_host=2", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"4 hosts do not split into the 8 slices"):
        Trainer(cfg, echo=lambda _: None).fit()
