"""Ends a local Ray cluster whose `fax` process was killed: run as
``python -m fax.cluster.watchdog PID FOLDER`` beside the process PID that starts the cluster, its files
in FOLDER (``hosts.start_local_ray``), from before Ray starts.

Ray's services and workers are that process's descendants. A killed process (kill -9, an OOM kill)
runs no cleanup, and Ray's GCS, raylet and agents would live on; the watchdog notes the descendants
while the process lives and, once it is gone, ends those still running, and any process whose command
line names FOLDER (one started in the last moments, or orphaned before it was noted). It exits on its
own when the cluster's GCS ends first (a normal ``ray.shutdown``).
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 0.5  # how often the descendants are noted
GRACE_S = 5.0  # from SIGTERM to SIGKILL for the cluster's processes


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (``is_running`` also checks the pid was not reused)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(head: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in head.children(recursive=True) if p.pid != os.getpid()]
    except psutil.NoSuchProcess:
        return []


def end(processes: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL for those still running after GRACE_S."""
    running = [p for p in processes if alive(p)]
    for p in running:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, stubborn = psutil.wait_procs(running, timeout=GRACE_S)
    for p in stubborn:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def naming(folder: str) -> list[psutil.Process]:
    """The processes whose command line names ``folder`` (Ray's services: their session and log paths)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(folder + os.sep in part for part in p.info["cmdline"] or ()):
            found.append(p)
    return found


def watch(head_pid: int, folder: str) -> None:
    head = psutil.Process(head_pid)
    seen: list[psutil.Process] = []
    gcs = None
    while alive(head):
        seen = descendants(head) or seen
        gcs = gcs or next((p for p in seen if p.name() == "gcs_server"), None)
        if gcs is not None and not alive(gcs):
            if alive(head):
                return  # the cluster was shut down by its process
            break  # the process was killed and its GCS ended right after: its agents may live on
        time.sleep(POLL_S)
    end(seen + naming(folder))


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
