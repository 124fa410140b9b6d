"""Planner: cluster presets, the cost model against hand-computed figures, pruning, search."""

import json
import time

import jax
import numpy as np
import pytest

import models
from fax import load_config
from fax import step as step_lib
from fax.cli import main
from models.config import param_count, train_flops_per_token
from parallel import make_mesh
from parallel.cost import Candidate, Workload, axis_links, efficiency, estimate, memory
from parallel.hardware import cluster_preset, present_cluster
from parallel.planner import plan, problems


def test_cluster_presets_count_hosts_and_devices():
    shapes = {name: (c.hosts, c.devices_per_host, c.device.name) for name in
              ("v4-8", "v4-1024", "v5e-256", "v5p-512", "a100-64", "h100-1024", "cpu-8")
              for c in [cluster_preset(name)]}
    assert shapes == {"v4-8": (1, 4, "TPU v4"), "v4-1024": (128, 4, "TPU v4"), "v5e-256": (64, 4, "TPU v5e"),
                      "v5p-512": (64, 4, "TPU v5p"), "a100-64": (8, 8, "A100 80GB SXM"),
                      "h100-1024": (128, 8, "H100 80GB SXM"), "cpu-8": (1, 8, "CPU (emulated device)")}
    with pytest.raises(ValueError, match="unknown cluster 'tpu-9'; use <family>-<count>"):
        cluster_preset("tpu-9")
    with pytest.raises(ValueError, match="12 devices do not fill whole hosts of 8"):
        cluster_preset("h100-12")
    here = present_cluster()
    assert here.present and (here.hosts, here.devices_per_host) == (1, 8)


def test_mesh_axes_cross_hosts_from_the_outside_in():
    h100 = cluster_preset("h100-16")  # 2 nodes of 8
    links = axis_links(Candidate(data=2, tensor=8), h100)
    assert links["tensor"] is h100.intra and links["data"] is h100.inter
    links = axis_links(Candidate(fsdp=8, tensor=2), h100)
    assert links["tensor"] is h100.intra and links["fsdp"] is h100.inter
    links = axis_links(Candidate(fsdp=4, tensor=2, data=2), h100)
    assert (links["tensor"], links["fsdp"], links["data"]) == (h100.intra, h100.intra, h100.inter)


def test_cost_model_reproduces_hand_computed_figures():
    cfg, cluster = models.preset("gpt-tiny"), cluster_preset("cpu-8")
    w = Workload(cfg, global_batch=16, seq_len=128)
    c = Candidate(fsdp=8)
    e = estimate(c, w, cluster)
    params = param_count(cfg)
    flops = train_flops_per_token(cfg, 128) * 16 * 128
    tokens_per_device = 16 * 128 / 8
    assert e.compute_s == pytest.approx(flops / 8 / (12.5e9 * efficiency(tokens_per_device, cfg.d_model)))
    link = cluster.intra
    gather = 7 / 8 * params * 2 / link.bandwidth + 7 * link.latency  # bf16 params, ring of 8
    scatter = 7 / 8 * params * 4 / link.bandwidth + 7 * link.latency  # fp32 gradients
    assert e.comm_s["fsdp"] == pytest.approx(2 * gather + scatter)
    assert e.comm_s["data"] == e.comm_s["tensor"] == e.comm_s["stage"] == 0
    mem = memory(c, w)
    assert mem["params"] == mem["grads"] == pytest.approx(params / 8 * 4)
    assert mem["optimizer"] == pytest.approx(params / 8 * 8)
    # tensor=2, data=4: one all-reduce of the fp32 gradient shard over data, 4 activation all-reduces a layer
    e2 = estimate(Candidate(data=4, tensor=2), w, cluster)
    assert e2.comm_s["data"] == pytest.approx(2 * (3 / 4 * params * 4 / 2 / link.bandwidth + 3 * link.latency))
    activation = 16 * 128 / 4 * cfg.d_model * 2
    assert e2.comm_s["tensor"] == pytest.approx(cfg.n_layers * 4 * 2 * (activation / 2 / link.bandwidth + link.latency))
    # remat full recomputes one forward: a third more compute than none at the same layout
    e3 = estimate(Candidate(fsdp=8, remat="full"), w, cluster)
    assert e3.compute_s == pytest.approx(e.compute_s * 4 / 3)
    assert e3.memory["activations"] < e.memory["activations"]


def test_layouts_that_cannot_run_are_pruned_with_the_reason():
    w = Workload(models.preset("gpt-tiny"), global_batch=16, seq_len=128)  # 2 layers, 8 heads, d_model 64
    assert problems(Candidate(tensor=3), w) == [("tensor", "tensor=3 does not divide n_heads=8")]
    assert problems(Candidate(stages=4), w) == [("stages", "2 layers do not split into 4 stages")]
    assert problems(Candidate(data=4, fsdp=2, microbatches=4), w) == [
        ("batch", "batch 16 does not split into data x fsdp x microbatches = 32")]
    assert problems(Candidate(sequence=3), w) == [("sequence", "sequence=3 does not divide the sequence length 128")]
    assert problems(Candidate(data=2, fsdp=4, tensor=2, microbatches=2), w) == []
    with pytest.raises(ValueError, match=r"no layout of llama-70b fits v4-8 .*needs [\d.]+ GiB per device of 32 GiB"):
        plan(models.preset("llama-70b"), cluster_preset("v4-8"), 64, 4096, "llama-70b")


def test_large_plans_take_seconds_are_deterministic_and_beat_the_templates():
    for name, cluster, batch, seq in (("gpt3-175b", "h100-1024", 1536, 2048), ("llama-70b", "v4-1024", 1024, 4096)):
        started = time.perf_counter()
        result = plan(models.preset(name), cluster_preset(cluster), batch, seq, name)
        assert time.perf_counter() - started < 10
        assert result.analytical and result.searched > 10_000 and result.best.fits
        assert result.best.memory_bytes <= 0.9 * cluster_preset(cluster).device.hbm_bytes
        for template in result.templates.values():
            if not isinstance(template, str):
                assert result.best.step_s <= template.step_s
        again = plan(models.preset(name), cluster_preset(cluster), batch, seq, name)
        assert [e.candidate for e in again.ranked] == [e.candidate for e in result.ranked]
        assert 0.2 < result.best.mfu < 0.7  # the datasheet peak is never reached, nor is it a toy figure


def test_present_plans_compile_on_the_present_devices():
    result = plan(models.preset("gpt-tiny"), present_cluster(), 16, 64, "gpt-tiny", max_stages=1)
    assert not result.analytical
    for e in result.ranked[:2]:
        c = e.candidate
        cfg = load_config(overrides=["model=gpt-tiny", "train.batch_size=16", "train.seq_len=64",
                                     f"train.microbatches={c.microbatches}", f"model.remat={c.remat}",
                                     *(f"parallel.{k}={v}" for k, v in c.axes.items())])
        training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()))
        state = jax.eval_shape(training.init)
        batch = jax.ShapeDtypeStruct((16, 65), np.int32, sharding=training.batch_sharding)
        compiled = training.step.lower(state, batch).compile()
        assert compiled.memory_analysis() is not None


def test_plan_command_prints_a_table_and_json(capsys):
    assert main(["plan", "--model", "llama-7b", "--cluster", "v4-256", "--global-batch", "1024", "--seq", "2048",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "analytical: this cluster is not present" in out and "templates:" in out and "rejected:" in out
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-8", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["best"]["candidate"]["fsdp"] * parsed["best"]["candidate"]["data"] >= 1
    assert main(["plan", "--model", "llama-70b", "--cluster", "v4-8", "--global-batch", "64", "--seq", "4096"]) == 2
