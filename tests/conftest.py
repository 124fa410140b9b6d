"""8 emulated CPU devices, set before jax initialises its backend."""

import atexit
import contextlib
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("FAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))
# The tests run on CPU devices; with libtpu installed (the tpu extra, for `fax compile`) a process that
# is not told so probes for a TPU at start-up, subprocesses and Ray workers included.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same train or serving step (in this process, in `fax` subprocesses, in Ray workers):
# XLA's persistent cache, shared through the environment and gone with the session, compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fax-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402

from fax.data import prepare, stdlib_dir, text_files  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared dataset of a few standard-library modules (fast to build)."""
    files = [stdlib_dir() / name for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py")]
    out = tmp_path_factory.mktemp("corpus")
    prepare(text_files(files), out)
    return out


@pytest.fixture(scope="session")
def traced_steps():
    """What the profiler traces under a folder hold: how many runs of the compiled train step, and
    the step numbers of its step markers."""
    def read(folder: Path) -> tuple[int, list[int]]:
        events = [e for trace in Path(folder).rglob("*.trace.json.gz") for e in json.load(gzip.open(trace))["traceEvents"]]
        runs = {e["args"]["run_id"] for e in events if e.get("args", {}).get("hlo_module") == "jit_train_step"}
        return len(runs), sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    return read


@contextlib.contextmanager
def _local_ray(hosts: int):
    import ray

    temp = tempfile.mkdtemp(prefix="faxr", dir="/tmp")  # short: Ray's Unix sockets live there
    ray.init(resources={"fax_host": hosts}, _temp_dir=temp, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def local_ray():
    """``with local_ray(n):`` a local Ray cluster offering n emulated hosts, in a temp dir of its own."""
    return _local_ray
