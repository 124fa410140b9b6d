"""kill -9 of `fax train` at random moments, then resume: is the result exactly the uninterrupted run's?

    python benchmarks/fault_injection.py [--local 8] [--ray 3] [--seed 0]

A reference run trains a small model to the end without interruption. Each trial starts the same
run in a fresh directory, kills it with SIGKILL at a random moment (start-up, compiling, training,
an asynchronous save under way), and in every other trial kills the resumed run again while it
restores or compiles; then it resumes to the end. A trial is exact when every step's loss equals the
reference's and the final checkpoint's arrays are bitwise equal to the reference's. Ray mode (2
emulated hosts x 4 devices, the cluster started by `fax train` itself) kills the head process: the
trial also checks that no process of the killed run is left (the watchdog ends the local cluster).
Printed: trials, exact resumes, what was under way at each kill; JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

STEPS = 24
SETTINGS = ["model=gpt-tiny", "train.batch_size=8", "train.seq_len=64", "train.sample_tokens=0", "train.log_every=1",
            f"train.steps={STEPS}", "checkpoint.every_n_steps=4", "checkpoint.max_to_keep=2"]
RAY = ["--emulate-hosts", "2", "--devices-per-host", "4"]


def command(run_dir: Path, corpus: Path, ray: bool) -> list[str]:
    return [sys.executable, "-m", "fax.cli", "train", *(RAY if ray else []), f"run_dir={run_dir}",
            f"data.path={corpus}", *SETTINGS]


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"JAX_PLATFORMS": "cpu"}


def run_to_end(run_dir: Path, corpus: Path, ray: bool) -> float:
    started = time.monotonic()
    with (run_dir.parent / f"{run_dir.name}.log").open("a") as log:
        code = subprocess.run(command(run_dir, corpus, ray), env=environment(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=900).returncode
    if code != 0:
        raise RuntimeError(f"{run_dir} ended with exit code {code}; see {run_dir}.log")
    return time.monotonic() - started


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def under_way(run_dir: Path, steps_before: int) -> str:
    """What the run was doing when killed: the steps it logged, whether a checkpoint was being written."""
    steps = logged_steps(run_dir) - steps_before
    saving = (run_dir / "checkpoints").exists() and any(
        ".orbax-checkpoint-tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
    return ("start-up, restore or first compile" if steps == 0 else f"training ({steps} steps logged)") + (
        ", a save under way" if saving else "")


def killed_at(run_dir: Path, corpus: Path, ray: bool, after_s: float) -> tuple[str, list[str]]:
    """Start the run, SIGKILL it ``after_s`` seconds later; what it was doing, and the processes it
    had started that are still running 20 s after the kill (empty: none)."""
    steps_before = logged_steps(run_dir)
    with (run_dir.parent / f"{run_dir.name}.log").open("a") as log:
        head = subprocess.Popen(command(run_dir, corpus, ray), env=environment(), stdout=log, stderr=subprocess.STDOUT)
    time.sleep(after_s)
    if head.poll() is not None:
        return "had already finished", []
    children = psutil.Process(head.pid).children(recursive=True)
    doing = under_way(run_dir, steps_before)
    head.send_signal(signal.SIGKILL)
    head.wait()
    deadline = time.monotonic() + 20
    left = children
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:  # reported, then ended so that the next trial starts clean
        p.kill()
    return doing, [p.name() for p in left]


def final_arrays(run_dir: Path) -> list[np.ndarray]:
    """The last checkpoint's params and optimizer state, as saved."""
    import jax

    from fax.checkpoint import Checkpointer

    checkpoints = Checkpointer(str(run_dir / "checkpoints"), read_only=True)
    try:
        return [np.asarray(leaf) for leaf in jax.tree.leaves(checkpoints.read_arrays(checkpoints.latest_step()))]
    finally:
        checkpoints.close()


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", type=int, default=8, help="trials in local mode")
    p.add_argument("--ray", type=int, default=3, help="trials in Ray mode (2 emulated hosts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fault_injection.json"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fax-faults-"))
    from fax.data import prepare, stdlib_dir

    corpus = root / "corpus"
    prepare([stdlib_dir() / name for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py")],
            corpus)
    results = []
    try:
        for ray, trials in ((False, args.local), (True, args.ray)):
            if not trials:
                continue
            mode = "ray" if ray else "local"
            reference = root / f"reference-{mode}"
            seconds = run_to_end(reference, corpus, ray)
            expected_losses, expected_arrays = losses(reference), final_arrays(reference)
            print(f"{mode}: the uninterrupted run took {seconds:.0f} s")
            for trial in range(trials):
                run_dir = root / f"{mode}-{trial}"
                kills = [killed_at(run_dir, corpus, ray, rng.uniform(2, seconds))]
                if trial % 2:  # the resumed run killed again, while it restores or compiles
                    kills.append(killed_at(run_dir, corpus, ray, rng.uniform(1, 8)))
                run_to_end(run_dir, corpus, ray)
                exact = losses(run_dir) == expected_losses and all(
                    np.array_equal(a, b) for a, b in zip(final_arrays(run_dir), expected_arrays, strict=True))
                left = sorted({name for _, names in kills for name in names})
                results.append({"mode": mode, "kills": [doing for doing, _ in kills], "exact": exact,
                                "processes_left": left})
                print(f"{mode} trial {trial}: killed during {' / then '.join(d for d, _ in kills)}: "
                      f"{'exact' if exact else 'NOT EXACT'}{'; left running: ' + ', '.join(left) if left else ''}")
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    exact = sum(r["exact"] for r in results)
    clean = sum(not r["processes_left"] for r in results)
    print(f"{len(results)} trials, {exact} exact resumes, {clean} with no process left behind")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trials": len(results), "exact": exact, "no_process_left": clean,
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
