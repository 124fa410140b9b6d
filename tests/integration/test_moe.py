"""Mixture of experts: one computation on every mesh, the dispatch as a NumPy reference computes it,
and the balance loss spreading the tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fax.config import load_config, layout_problems
from fax.data import Batch
from fax.models import ModelConfig
from fax.models.layers import MoeMlp
from fax.models.moe import capacity_slots
from fax.parallel import ParallelConfig, make_mesh, with_activation_sharding
from fax.train import step as step_lib

MOE = ["model=llama-tiny", "model.moe_experts=4", "model.moe_top_k=2", "train.batch_size=16", "train.seq_len=32"]


def losses(overrides: list[str], n_devices: int, steps: int = 2) -> list[dict[str, np.ndarray]]:
    cfg = load_config(overrides=MOE + overrides)
    assert not layout_problems(cfg, cfg.parallel.axis_sizes(n_devices))
    training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()[:n_devices]))
    state, out = training.init(), []
    for i in range(steps):
        tokens = np.random.default_rng(i).integers(0, cfg.model.vocab_size, (16, cfg.seq_len + 1))
        state, metrics = training.step(state, jax.device_put(Batch.of(tokens), training.batch_sharding))
        out.append({k: np.asarray(v) for k, v in metrics.items()})
    return out


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_parallel_meshes_train_as_one_device(dispatch):
    extra = [f"model.moe_dispatch={dispatch}", "model.moe_capacity_factor=1.0"]
    one = losses(["parallel.fsdp=1", *extra], 1)
    # (expert=4 x fsdp=2: the dispatch reference test; a pipeline with expert=2: the one below)
    for mesh in [["parallel.expert=2", "parallel.fsdp=2", "parallel.tensor=2", "model.remat=full"]]:
        many = losses([*mesh, *extra], 8)
        for a, b in zip(one, many):
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6, err_msg=str(mesh))
            np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5, err_msg=str(mesh))
            np.testing.assert_allclose(b["expert_load"], a["expert_load"], atol=1e-6)
    first = one[0]
    assert first["expert_load"].shape == (4,) and first["expert_load"].sum() == pytest.approx(1.0)
    assert first["moe_balance"] >= 1.0 - 1e-6  # 1 exactly when perfectly even
    assert (first["moe_dropped"] > 0) == (dispatch == "capacity")


def test_a_pipelined_mixture_trains_as_one_device():
    """The router statistics travel with the rows through the stages (interleaved, expert-parallel):
    the same losses, gradients and balance loss as one device accumulating the same microbatches. A
    dense first block runs before the pipeline, then four groups of a dense block and a mixture, one
    per chunk of the 2 stages x 2 virtual stages."""
    extra = ["model.n_layers=9", "model.moe_first_dense=1", "model.moe_every=2", "parallel.virtual_stages=2",
             "train.microbatches=4"]
    one = losses(["parallel.fsdp=1", *extra], 1)
    piped = losses(["parallel.stage=2", "parallel.expert=2", "parallel.fsdp=2", "parallel.stage_remat=true", *extra], 8)
    for a, b in zip(one, piped):
        for key in ("loss", "grad_norm", "moe_balance", "expert_load"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)


def reference_moe(x, router, wi, wg, wo, k, capacity=None):
    """What a mixture of experts computes, token by token in NumPy: softmax router, top-k weights
    renormalised, SwiGLU experts; with ``capacity``, each expert's queue per row filled with all
    first choices in token order, then all second choices, the rest dropped."""
    b, length, _ = x.shape
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., :k]
    weights = np.take_along_axis(probs, top, -1)
    weights /= weights.sum(-1, keepdims=True)
    y, dropped = np.zeros_like(x), 0
    for row in range(b):
        queue = np.zeros(router.shape[1], int)
        for choice in range(k):
            for t in range(length):
                e = top[row, t, choice]
                if capacity is not None and queue[e] >= capacity:
                    dropped += 1
                    continue
                queue[e] += 1
                gate = x[row, t] @ wg[e]
                h = gate / (1 + np.exp(-gate)) * (x[row, t] @ wi[e])
                y[row, t] += weights[row, t, choice] * (h @ wo[e])
    return y, dropped / (b * length * k)


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_dispatch_is_the_reference_on_one_device_and_over_experts(capacity_factor):
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=4, d_ff=48, activation="swiglu", norm="rmsnorm",
                      use_bias=False, n_layers=1, moe_experts=8, moe_top_k=2, init_std=0.3,
                      moe_dispatch="dropless" if capacity_factor is None else "capacity",
                      moe_capacity_factor=capacity_factor or 1.0)
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(MoeMlp(cfg, nnx.Rngs(0)))
    x = np.random.default_rng(1).normal(size=(8, 16, 32)).astype(np.float32)
    p = {k: np.asarray(v) for k, v in nnx.to_pure_dict(params).items()}
    capacity = None if capacity_factor is None else int(np.ceil(capacity_factor * 16 * 2 / 8))
    expected, expected_dropped = reference_moe(x, p["router"], p["wi"], p["wg"], p["wo"], 2, capacity)

    def apply(params, x):
        y, stats = nnx.merge(graphdef, params)(x)
        return y, stats.dropped.mean()

    for parallel, n in ((ParallelConfig(fsdp=1), 1), (ParallelConfig(expert=4, fsdp=2), 8),
                        (ParallelConfig(expert=2, data=2, tensor=2), 8)):
        mesh = make_mesh(parallel, jax.devices()[:n])
        y, dropped = jax.jit(with_activation_sharding(apply, mesh))(params, x)
        np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5, err_msg=str(parallel))
        assert float(dropped) == pytest.approx(expected_dropped, abs=1e-7)
    if capacity_factor == 0.5:
        assert expected_dropped > 0.3  # half the even share: at least half of the assignments dropped


def balanced_load(aux_weight: float, steps: int = 60) -> float:
    """max / mean expert load over the last steps of a toy run on skewed (Zipfian) tokens."""
    cfg = load_config(overrides=[
        "model=llama-tiny", "model.moe_experts=8", "model.n_layers=1", "model.d_model=64", "model.n_heads=4",
        "model.n_kv_heads=4", "model.d_ff=128", "model.vocab_size=64", f"model.moe_aux_loss={aux_weight}",
        "model.moe_z_loss=0", "parallel.fsdp=1", "optim.lr=1e-2", "optim.warmup_steps=0",
        "train.batch_size=16", "train.seq_len=32", f"train.steps={steps}"])
    training = step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    state, rng, loads = training.init(), np.random.default_rng(0), []
    zipf = 1.0 / np.arange(1, 65) ** 1.2
    for _ in range(steps):
        state, metrics = training.step(state, Batch.of(rng.choice(64, size=(16, 33), p=zipf / zipf.sum())))
        loads.append(np.asarray(metrics["expert_load"]))
    load = np.mean(loads[-10:], axis=0)
    return float(load.max() / load.mean())


def test_the_balance_loss_spreads_the_tokens():
    without, with_loss = balanced_load(0.0), balanced_load(1.0)
    assert with_loss < 1.5 < without, (with_loss, without)


def test_moe_settings_are_checked_before_compiling():
    assert any("model.moe_top_k=9" in p for p in ModelConfig(moe_experts=8, moe_top_k=9, use_bias=False).problems())
    assert any("model.use_bias" in p for p in ModelConfig(moe_experts=8).problems())
    cfg = load_config(overrides=MOE + ["parallel.expert=8", "parallel.fsdp=1"])
    assert any("parallel.expert=8 must divide model.moe_experts=4" in p
               for p in layout_problems(cfg, cfg.parallel.axis_sizes(8)))
    dense = load_config(overrides=["model=llama-tiny", "parallel.expert=2", "parallel.fsdp=4"])
    assert any("a dense model" in p for p in layout_problems(dense, dense.parallel.axis_sizes(8)))
    lora = load_config(overrides=MOE + ["lora.rank=4", "lora.targets=[attn.wq,mlp.wi]"])
    assert any("not its per-expert MLPs" in p for p in lora.lora.problems(lora.model))
    mixed = load_config(overrides=MOE + ["model.n_layers=5", "model.moe_first_dense=1", "model.moe_every=2"])
    assert any("nothing of one with dense blocks too" in p for p in
               dataclasses.replace(mixed.lora, rank=4).problems(mixed.model))
    assert any("do not split into groups of model.moe_every=3" in p
               for p in mixed.model.replace(moe_every=3).problems())
    piped = load_config(overrides=MOE + ["model.n_layers=5", "model.moe_first_dense=1", "model.moe_every=2",
                                         "parallel.stage=4", "parallel.fsdp=2", "train.microbatches=4"])
    assert any("stack's 2 blocks" in p for p in layout_problems(piped, piped.parallel.axis_sizes(8)))


def test_capacity_slots_fill_first_choices_first():
    experts = jnp.array([[[0, 1], [0, 2], [0, 1]]])  # 3 tokens of one row, top-2
    slots = np.asarray(capacity_slots(experts, 3, 2))
    # expert 0: the first two tokens' first choices; the third's dropped (slot 6); expert 1: tokens 0 and 2
    np.testing.assert_array_equal(slots, [[[0, 2], [1, 4], [6, 3]]])

