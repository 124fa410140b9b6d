"""The optimizer every run trains with: global-norm clipping, then AdamW that decays matrices only,
on a linear warmup then a cosine decay to a floor."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from fax import models
from fax.config import OptimConfig
from fax.train.step import decay_mask, lr_schedule, make_optimizer


def exempt_from_decay(preset: str) -> set[str]:
    shapes = jax.eval_shape(functools.partial(models.init_params, models.preset(preset), 0))
    return {jax.tree_util.keystr(path, simple=True, separator="/")
            for path, decays in jax.tree_util.tree_leaves_with_path(decay_mask(shapes)) if not decays}


def test_norms_and_biases_do_not_decay():
    assert exempt_from_decay("gpt-tiny") == {
        "blocks/attn/q_bias", "blocks/attn/k_bias", "blocks/attn/v_bias", "blocks/attn/out_bias", "blocks/mlp/in_bias",
        "blocks/mlp/out_bias", "blocks/attn_norm/scale", "blocks/attn_norm/bias", "blocks/mlp_norm/scale",
        "blocks/mlp_norm/bias", "final_norm/scale", "final_norm/bias"}
    assert exempt_from_decay("llama-tiny") == {"blocks/attn_norm/scale", "blocks/mlp_norm/scale", "final_norm/scale"}


def adamw_reference(optim: OptimConfig, steps: int, params: dict, grads: list[dict], decays: dict) -> dict:
    """AdamW written out in NumPy (float64), each gradient first scaled to at most ``clip_norm``."""
    schedule = lr_schedule(optim, steps)
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    params = dict(params)
    for t, g in enumerate(grads):
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        g = {k: x * min(1.0, optim.clip_norm / norm) for k, x in g.items()}
        lr = float(schedule(t))
        for k in params:
            m[k] = optim.b1 * m[k] + (1 - optim.b1) * g[k]
            v[k] = optim.b2 * v[k] + (1 - optim.b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - optim.b1 ** (t + 1)), v[k] / (1 - optim.b2 ** (t + 1))
            step = m_hat / (np.sqrt(v_hat) + optim.eps) + (optim.weight_decay * params[k] if decays[k] else 0)
            params[k] = params[k] - lr * step
    return params


def test_a_step_clips_the_gradient_then_applies_adamw():
    optim = OptimConfig(lr=0.1, warmup_steps=1, weight_decay=0.5, clip_norm=1.0)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "scale": rng.normal(size=4)}
    # The first gradient is clipped (norm ~30), the second is not (norm ~0.3): their ratio reaches
    # Adam's moments, so a missing or misplaced clip changes the second update.
    grads = [{k: 10 * rng.normal(size=p.shape) for k, p in params.items()},
             {k: 0.1 * rng.normal(size=p.shape) for k, p in params.items()}]
    tx = make_optimizer(optim, steps=10)
    ours = {k: np.float32(p) for k, p in params.items()}
    state = tx.init(ours)
    for g in grads:
        updates, state = tx.update({k: np.float32(x) for k, x in g.items()}, state, ours)
        ours = {k: ours[k] + np.asarray(updates[k]) for k in ours}
    expected = adamw_reference(optim, 10, params, grads, {"w": True, "scale": False})
    for k in params:
        np.testing.assert_allclose(ours[k], expected[k], rtol=1e-5, atol=1e-6)
    unclipped = adamw_reference(dataclasses.replace(optim, clip_norm=1e9), 10, params, grads,
                                {"w": True, "scale": False})
    assert not np.allclose(unclipped["w"], expected["w"], rtol=1e-3)  # the clip matters here


def test_schedule_warms_up_linearly_then_decays_to_its_floor():
    schedule = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1), steps=100)
    lr = np.array([float(schedule(s)) for s in range(101)])
    assert lr[0] == 0 and lr[5] == pytest.approx(5e-4) and lr[10] == pytest.approx(1e-3)
    assert lr[55] == pytest.approx(1e-4 + 9e-4 * 0.5)  # halfway through the cosine
    assert lr[100] == pytest.approx(1e-4)
    assert np.all(np.diff(lr[:11]) > 0) and np.all(np.diff(lr[10:]) < 0)
    # A run shorter than its warmup reaches the peak on its last step.
    short = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=20), steps=5)
    assert float(short(4)) == pytest.approx(1e-3)
