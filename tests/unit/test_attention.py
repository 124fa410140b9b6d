"""The attention kernels agree with XLA's attention, values and gradients, with grouped kv heads and
packed documents; ``auto`` picks the kernel each backend has."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fax import models
from fax.models.attention import attend, blockwise_attention, flash_attention, softcapped_attention
from fax.models.config import attention_implementation


def inputs(length=128, heads=4, kv_heads=2, head_dim=16):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, length, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.cumsum(rng.random((2, length)) < 0.03, axis=1), jnp.int32)
    return q, k, v, segments


def xla(q, k, v, segments):
    return jax.nn.dot_product_attention(q, k, v, mask=(segments[:, :, None] == segments[:, None, :])[:, None],
                                        is_causal=True)


def assert_same_as_xla(kernel, q, k, v, segments):
    def loss(f):
        return lambda q, k, v: (f(q, k, v, segments) * jnp.sin(q)).sum()

    np.testing.assert_allclose(kernel(q, k, v, segments), xla(q, k, v, segments), atol=2e-6)
    for got, want in zip(jax.grad(loss(kernel), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("block", [32, 128])
def test_blockwise_attention_is_xlas(block):
    assert_same_as_xla(lambda q, k, v, s: blockwise_attention(q, k, v, s, block), *inputs())


def test_soft_capped_attention_is_xlas_when_the_cap_is_far_and_the_tiled_kernels_cap_alike():
    """Gemma 2's capped scores: the plain XLA form matches XLA's attention when the cap never bites,
    and the blockwise kernel and the TPU's (interpreted) give the same values and gradients as it when
    the cap does (cap 0.5)."""
    assert_same_as_xla(lambda q, k, v, s: softcapped_attention(q, k, v, s, 1e6), *inputs())
    q, k, v, segments = inputs()
    capped = softcapped_attention(q, k, v, segments, 0.5)
    assert not np.allclose(capped, xla(q, k, v, segments), atol=1e-2)
    for kernel in (lambda q, k, v: blockwise_attention(q, k, v, segments, 32, 0.5),
                   lambda q, k, v: flash_attention(q, k, v, segments, cap=0.5)):
        np.testing.assert_allclose(kernel(q, k, v), capped, atol=2e-6)
        grads = [jax.grad(lambda q, k, v: (f(q, k, v) * jnp.sin(q)).sum(), (0, 1, 2))(q, k, v)
                 for f in (lambda q, k, v: softcapped_attention(q, k, v, segments, 0.5), kernel)]
        for got, want in zip(*grads):
            np.testing.assert_allclose(got, want, atol=2e-5)
    cfg = models.preset("llama-tiny").replace(attn_softcap=50.0, dtype="bfloat16")
    assert attention_implementation(cfg, "tpu", 1024) == "flash"
    assert attention_implementation(cfg, "gpu", 1024) == "xla"  # cuDNN has no cap


def test_blockwise_attention_set_for_a_length_no_tile_divides_runs_as_one_block():
    q, k, v, segments = inputs(length=100)
    cfg = models.preset("llama-tiny").replace(attention_impl="blockwise")
    np.testing.assert_allclose(attend(cfg, q, k, v, segments), xla(q, k, v, segments), atol=2e-6)


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped query heads, and one kv head per query head
def test_the_tpu_flash_kernel_is_xlas_in_interpret_mode(kv_heads):
    # off a TPU the splash kernel runs in Pallas' interpreter: the kernel's own program, on the CPU
    assert_same_as_xla(flash_attention, *inputs(kv_heads=kv_heads))


def test_auto_picks_the_kernel_each_backend_has():
    cfg = models.preset("llama-tiny").replace(dtype="bfloat16")
    assert attention_implementation(cfg, "gpu", 4096) == "cudnn"
    assert attention_implementation(cfg, "tpu", 4096) == "flash"
    assert attention_implementation(cfg, "tpu", 100) == "xla"  # the Pallas kernel tiles multiples of 128
    assert attention_implementation(cfg, "cpu", 4096) == "blockwise"  # no seq x seq scores for long sequences
    assert attention_implementation(cfg, "cpu", 256) == "xla"
    assert attention_implementation(cfg, "cpu", 4100) == "xla"  # a length the blockwise kernel does not tile
    assert attention_implementation(cfg.replace(dtype="float32"), "gpu", 4096) == "blockwise"


def test_a_window_limits_every_kernel_to_the_keys_just_before_each_query():
    """Mistral's sliding window (each token sees itself and the window - 1 before it) in XLA's kernel,
    the soft-capped one, the blockwise one and the TPU's (interpreted), values and gradients, against a
    NumPy mask; a window that alternates with global layers leaves the TPU's, whose mask is fixed."""
    q, k, v, segments = inputs()
    window = 24
    behind = np.arange(128)[:, None] - np.arange(128)[None, :]
    mask = jnp.asarray((behind >= 0) & (behind < window))[None] & (segments[:, :, None] == segments[:, None, :])

    def reference(q, k, v, segments):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])

    cfg = models.preset("llama-tiny").replace(attention_window=window)
    kernels = [lambda q, k, v, s: attend(cfg, q, k, v, s),
               lambda q, k, v, s: softcapped_attention(q, k, v, s, 1e6, window),
               lambda q, k, v, s: blockwise_attention(q, k, v, s, 32, 0.0, window),
               lambda q, k, v, s: flash_attention(q, k, v, s, window=window)]
    assert not np.allclose(reference(q, k, v, segments), xla(q, k, v, segments), atol=1e-2)  # the window bites
    for kernel in kernels:
        def loss(f):
            return lambda q, k, v: (f(q, k, v, segments) * jnp.sin(q)).sum()
        np.testing.assert_allclose(kernel(q, k, v, segments), reference(q, k, v, segments), atol=2e-6)
        for got, want in zip(jax.grad(loss(kernel), (0, 1, 2))(q, k, v), jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(got, want, atol=2e-5)
    assert attention_implementation(cfg.replace(dtype="bfloat16"), "tpu", 4096) == "flash"
    alternating = cfg.replace(global_every=2, dtype="bfloat16")
    assert attention_implementation(cfg.replace(dtype="bfloat16"), "gpu", 4096) == "cudnn"
    for platform in ("tpu", "gpu"):
        assert attention_implementation(alternating, platform, 4096) == "blockwise"
    for fixed in ("flash", "cudnn"):
        assert not cfg.replace(attention_impl=fixed).problems()
        assert any("model.global_every=2" in p for p in alternating.replace(attention_impl=fixed).problems())
