"""Compiled CPU kernels (XLA FFI custom calls), built from their C++ source on first use with the
machine's C++ compiler and cached per source, compiler, jaxlib and CPU. Where none builds, callers
keep XLA's own lowering: the kernels are an optimisation, never a requirement."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from models.config import ModelConfig

DECODE_ATTENTION_SOURCE = Path(__file__).with_name("decode_attention.cc")
DECODE_ATTENTION_TARGET = "fax_decode_attention"
DECODE_ATTENTION_HEAD_DIMS = (8, 16, 32, 64, 128)  # the head dims the kernel is instantiated for
# -ffast-math lets the compiler vectorise exp and the sums; it is kept off the link (-shared), where
# it would add a start-up routine that sets flush-to-zero for the whole process.
COMPILE_FLAGS = ("-O3", "-ffast-math", "-std=c++17", "-fPIC", "-w")
DISABLE_ENV = "FAX_CPU_KERNELS"  # "0": never build or use them


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu() -> str:
    """What the machine code is built for: -march=native ties a library to its CPU's features."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build(source: Path, folder: Path) -> Path:
    """The shared library of ``source`` in ``folder``, compiled now unless this machine built it there before."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C++ compiler on PATH (c++, g++ or clang++); set CXX to one")
    native = ("-march=native",) if platform.machine() in ("x86_64", "AMD64") else ()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), *COMPILE_FLAGS, *native, version, jaxlib.__version__,
                                    _cpu()]).encode()).hexdigest()[:16]
    library = folder / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        obj, built = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        for command in ([compiler, *COMPILE_FLAGS, *native, "-I", jax.ffi.include_dir(), "-c", str(source), "-o", str(obj)],
                        [compiler, "-shared", str(obj), "-o", str(built)]):
            subprocess.run(command, capture_output=True, text=True, check=True)
        os.replace(built, library)  # whole or not at all, for processes building it side by side
    return library


@functools.cache
def decode_attention_ready(folder: Path) -> bool:
    """Whether the decode-attention kernel is built (kept in ``folder``) and registered with XLA,
    building it now if needed (~2 s once per machine); False, with a warning, where it cannot be built."""
    if os.environ.get(DISABLE_ENV) == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(DECODE_ATTENTION_SOURCE, folder)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else str(e)
        warnings.warn(f"the CPU decode-attention kernel did not build, so decoding on the CPU uses XLA's attention "
                      f"(slower at long contexts): {detail}", stacklevel=2)
        return False
    jax.ffi.register_ffi_target(DECODE_ATTENTION_TARGET, jax.ffi.pycapsule(library.FaxDecodeAttention), platform="cpu")
    return True


def supports_decode_attention(cfg: ModelConfig) -> bool:
    """Whether the kernel handles this model's attention: float32, a head dim it is built for."""
    return cfg.dtype == "float32" and cfg.kv_head_dim in DECODE_ATTENTION_HEAD_DIMS


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array) -> jax.Array:
    """``models.layers.cached_attention`` of one new token a row (q [b, 1, heads, head_dim] at
    positions [b, 1]), by the kernel (``decode_attention_ready`` first)."""
    batch, _, heads, head_dim = q.shape
    groups = q.reshape(batch, keys.shape[1], heads // keys.shape[1], head_dim)
    out = jax.ffi.ffi_call(DECODE_ATTENTION_TARGET, jax.ShapeDtypeStruct(groups.shape, jnp.float32))(
        groups, keys, values, (positions[:, 0] + 1).astype(jnp.int32))
    return out.reshape(q.shape)
