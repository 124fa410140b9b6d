"""Model shapes, annotations and the attention's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fax import models
from fax.models.layers import rope, rope_frequencies
from fax.parallel import DEFAULT_RULES


@pytest.mark.parametrize("name", models.preset_names())
def test_presets_count_params_without_allocating(name):
    cfg = models.preset(name)
    _, state = models.abstract(cfg)  # shapes only, even for 175B
    assert sum(x.size for x in jax.tree.leaves(state)) == models.param_count(cfg)


def test_published_sizes():
    assert round(models.param_count(models.preset("llama-7b")) / 1e9, 2) == 6.74
    assert round(models.param_count(models.preset("llama-70b")) / 1e9, 1) == 69.0
    assert round(models.param_count(models.preset("gpt3-175b")) / 1e9) == 175


def test_train_flops_per_token_by_hand():
    cfg = models.preset("llama-7b")
    d, layers = cfg.d_model, cfg.n_layers
    not_in_matmuls = cfg.vocab_size * d + (2 * layers + 1) * d  # input embedding and RMSNorm scales
    expected = 6 * (models.param_count(cfg) - not_in_matmuls) + 12 * layers * d * 2048
    assert models.train_flops_per_token(cfg, 2048) == expected


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_every_param_has_known_logical_axes(name):
    _, state = models.abstract(models.preset(name))
    axes = models.logical_axes(state)
    shapes = jax.tree.map(lambda x: x.shape, jax.tree.leaves(state))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_axes) == len(shapes)
    for ax, shape in zip(flat_axes, shapes):
        assert len(ax) == len(shape)
        assert all(a is None or a in DEFAULT_RULES for a in ax)
    assert axes["blocks"]["attn"]["wq"][0] == "layers"


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_causal_future_tokens_do_not_change_past_logits(name):
    cfg = models.preset(name)
    model = models.build(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    changed = tokens.at[:, 12:].set((tokens[:, 12:] + 7) % cfg.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not np.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_document_mask_reads_each_packed_document_as_if_alone(name):
    """A row packing the tail of one document, a whole one and the head of a third: under the
    document mask each piece's logits are those of the piece run by itself (from position 0)."""
    cfg = models.preset(name)
    model = models.build(cfg, seed=1)
    eos = cfg.vocab_size - 1
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, eos, n) for n in (5, 9, 10)]
    pieces[0][-1] = pieces[1][-1] = eos  # the first two end their documents
    row = jnp.asarray(np.concatenate(pieces)[None], jnp.int32)
    ends = (row == eos).astype(jnp.int32)
    packed = model(row, segments=jnp.cumsum(ends, axis=1) - ends)
    start = 0
    for piece in pieces:
        alone = model(jnp.asarray(piece[None], jnp.int32))
        np.testing.assert_allclose(packed[:, start:start + len(piece)], alone, rtol=1e-5, atol=1e-5)
        start += len(piece)
    from fax.data import document_segments

    assert document_segments(np.asarray(row), eos).tolist() == [[0] * 5 + [1] * 9 + [2] * 10]
    # Without the mask the later pieces read the earlier ones.
    assert not np.allclose(model(row)[:, 5:], packed[:, 5:], atol=1e-3)


@pytest.mark.parametrize("scaling", ["none", "linear", "llama3"])
def test_rope_scores_depend_only_on_relative_position(scaling):
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
    cfg = models.preset("llama-tiny").replace(head_dim=16, rope_scaling=scaling, rope_factor=8.0, rope_original_len=64)
    freqs = rope_frequencies(cfg)

    def score(pq, pk):
        return float(jnp.sum(rope(q, jnp.array([pq]), freqs) * rope(k, jnp.array([pk]), freqs)))

    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_llama3_rope_divides_long_wavelengths_keeps_short_ones_and_blends_between():
    plain = rope_frequencies(models.preset("llama-tiny").replace(head_dim=64))
    cfg = models.preset("llama-tiny").replace(head_dim=64, rope_scaling="llama3", rope_factor=8.0,
                                              rope_original_len=64)
    scaled, wavelength = rope_frequencies(cfg), 2 * np.pi / plain
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-6)
    between = ~short & ~long
    assert between.any() and np.all((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8))


def test_published_sizes_of_the_open_families():
    """The presets of Llama 3, Mistral and Qwen have their published parameter counts."""
    for name, billions in (("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3.1-405b", 405.85),
                           ("mistral-7b", 7.25), ("qwen2.5-7b", 7.62), ("qwen2.5-72b", 72.71), ("qwen3-8b", 8.19),
                           ("qwen3-32b", 32.76), ("gemma-7b", 8.54), ("gemma2-9b", 9.24), ("gemma2-27b", 27.23)):
        assert models.param_count(models.preset(name)) / 1e9 == pytest.approx(billions, abs=0.01), name


def test_bfloat16_compute_tracks_float32():
    cfg = models.preset("llama-tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)), jnp.int32)
    f32 = models.build(cfg, seed=0)(tokens)
    bf16 = models.build(cfg.replace(dtype="bfloat16"), seed=0)(tokens)
    assert bf16.dtype == jnp.float32  # logits always come out in float32 for the loss
    np.testing.assert_allclose(bf16, f32, atol=5e-2)


def test_auto_attention_is_the_fused_kernel_only_where_it_exists():
    from fax.models.config import attention_implementation
    cfg = models.preset("llama-tiny")
    assert attention_implementation(cfg.replace(dtype="bfloat16"), "gpu") == "cudnn"
    assert attention_implementation(cfg, "gpu") == "xla"  # cuDNN has no float32 flash attention
    assert attention_implementation(cfg.replace(dtype="bfloat16"), "tpu") == "xla"
    assert attention_implementation(cfg.replace(dtype="bfloat16"), "cpu") == "xla"
    assert attention_implementation(cfg.replace(attention_impl="cudnn"), "cpu") == "cudnn"  # as set


def test_the_tpu_grouped_matmul_kernel_is_ragged_dots_in_interpret_mode(monkeypatch):
    """On TPUs the experts' grouped matmuls are the Pallas kernels (whose weight gradient is grouped
    too, where XLA's TPU lowering of ragged_dot's is dense): the same values and gradients, and zero
    past the groups' rows (the padding of an all-to-all's buffer)."""
    from jax.experimental.pallas import tpu as pltpu

    from fax.models import moe

    rng = np.random.default_rng(0)
    rows, weights = jnp.asarray(rng.normal(size=(96, 32)), jnp.float32), jnp.asarray(rng.normal(size=(4, 32, 48)), jnp.float32)
    sizes = jnp.array([30, 0, 41, 17], jnp.int32)  # 88 rows in groups, 8 of padding

    def loss(x, w):
        return jnp.sum(moe.grouped_matmul(x, w, sizes) ** 2)

    expected, expected_grads = moe.grouped_matmul(rows, weights, sizes), jax.grad(loss, (0, 1))(rows, weights)
    monkeypatch.setattr(moe, "platform", lambda: "tpu")
    with pltpu.force_tpu_interpret_mode():
        got, grads = moe.grouped_matmul(rows, weights, sizes), jax.grad(loss, (0, 1))(rows, weights)
        assert "pallas_call" in str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(rows, weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert not np.asarray(got[88:]).any()
    np.testing.assert_allclose(grads[0][:88], expected_grads[0][:88], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(grads[1], expected_grads[1], rtol=1e-5, atol=1e-3)
