"""The compiled CPU decode-attention kernel: the same attention as XLA's, built once and safely, and
left out wherever it cannot run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from fax.data import cache_dir
from fax.serve import Engine, serving_mesh
from models import cpu_kernels
from models.layers import cached_attention


@pytest.mark.parametrize("kv_heads,heads,head_dim", [(8, 8, 32), (2, 8, 8), (4, 4, 64), (1, 2, 128)])
def test_the_kernel_attends_as_xla_does(kv_heads, heads, head_dim):
    assert cpu_kernels.decode_attention_ready(cache_dir() / "kernels"), "the kernel did not build: is there a C++ compiler?"
    rows, slots = 5, 24
    q, keys, values = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(
        [(rows, 1, heads, head_dim), (rows, kv_heads, slots, head_dim), (rows, kv_heads, slots, head_dim)]))
    # the first slot only, some, all but one, all, and a position past the cache (it sees every slot)
    positions = jnp.array([[0], [5], [22], [23], [40]])
    got = jax.jit(cpu_kernels.decode_attention)(q, keys, values, positions)
    expected = jax.jit(cached_attention)(q, keys, values, positions)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got[0], jnp.repeat(values[0, :, :1], heads // kv_heads, axis=0).transpose(1, 0, 2),
                               rtol=1e-6)  # one visible slot: its value, whatever the scores


def test_loading_the_kernel_leaves_denormals_alone():
    """Linked with -ffast-math, a library would set flush-to-zero for the whole process when loaded."""
    assert cpu_kernels.decode_attention_ready(cache_dir() / "kernels")
    tiny = np.float32(1e-39)  # a float32 denormal
    assert tiny * np.float32(2) == np.float32(2e-39) != 0


def test_a_build_leaves_one_whole_library_and_is_reused(tmp_path):
    library = cpu_kernels._build(cpu_kernels.DECODE_ATTENTION_SOURCE, tmp_path)
    assert list(tmp_path.iterdir()) == [library]  # no temporary files beside it
    built = library.stat().st_mtime_ns
    assert cpu_kernels._build(cpu_kernels.DECODE_ATTENTION_SOURCE, tmp_path) == library
    assert library.stat().st_mtime_ns == built


def test_without_a_compiler_decode_keeps_xla_attention_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="did not build, so decoding on the CPU uses XLA's attention"):
        assert not cpu_kernels.decode_attention_ready.__wrapped__(tmp_path / "kernels")
    assert not (tmp_path / "kernels").exists()


def test_the_engine_uses_the_kernel_only_where_it_runs():
    cfg = models.preset("gpt-tiny")
    params = nnx.to_pure_dict(nnx.state(models.build(cfg)))
    assert Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1])).decode_kernel
    assert not Engine(cfg, params, serving_mesh(cfg, jax.devices()[:8])).decode_kernel  # no sharding rule
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    assert not Engine(bf16, params, serving_mesh(bf16, jax.devices()[:1])).decode_kernel
    with pytest.raises(ValueError, match="decode_kernel=True needs one CPU device"):
        Engine(cfg, params, serving_mesh(cfg, jax.devices()[:8]), decode_kernel=True)
