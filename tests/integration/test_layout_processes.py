"""In fresh Python processes: fax imports beside a user's own ``models``/``parallel`` packages, and
``fax --help`` starts without jax."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def crowded(tmp_path):
    """A folder holding what ML projects often hold: its own models/ and parallel/ packages and a models.py."""
    for package in ("models", "parallel"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('the user's own package was imported')\n")
    (tmp_path / "models.py").write_text("raise ImportError('the user's own models.py was imported')\n")
    return tmp_path


def run_in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, env=env, timeout=300)


def test_imports_work_beside_a_users_own_models_and_parallel_packages(crowded):
    code = ("import fax.train.loop, fax.serving.engine, fax.parallel.planner, fax.models, fax.parallel; "
            "from fax.train.loop import Trainer; from fax.serving.engine import Engine; "
            "from fax.parallel.planner import plan; print(fax.models.__file__)")
    done = run_in(crowded, "-c", code)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent.resolve() in (ROOT / "models", ROOT / "fax" / "models")
    trained = run_in(crowded, "-m", "fax.cli", "--cpu-devices", "2", "train", "train.steps=2", "model=gpt-tiny",
                     "train.sample_tokens=8", f"run_dir={crowded / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "step      2  loss" in trained.stdout and "fax: sample ->" in trained.stdout


def test_help_imports_no_jax(tmp_path):
    for argv in (["--help"], ["train", "--help"], ["serve", "--help"], ["config"]):
        code = (f"import sys; from fax.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))[:3]")
        if argv == ["config"]:  # runs the command itself, which must not need jax either
            code = code.replace(f"main({argv!r})", "from fax.cli import config, parse; config.run(parse(['config']))")
        done = run_in(tmp_path, "-c", code)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
