"""One run per run directory (framework/checkpointing/run_lock.py): a live holder refuses a second job by name,
a SIGKILLed holder's lock file does not, and a requeue of the same SLURM job proceeds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from framework.checkpointing.run_lock import LOCK_NAME, RunDirectoryBusy, acquire, release, run_directory_lock

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys
from framework.checkpointing.run_lock import acquire
acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


def _holder(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_sigkilled_one_does_not_block(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = _holder(tmp_path, {"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(RunDirectoryBusy) as refused:
            acquire(tmp_path)
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, SLURM job 4242" in message
        assert "\n" not in message and "name=" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the killed holder's file is still there ...
    with run_directory_lock(tmp_path):  # ... and does not block the resume
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
        with run_directory_lock(tmp_path):  # re-entrant within one process (train's _main, then run)
            pass
        holder = _holder(tmp_path / "other")  # another directory is independent
        holder.stdin.close()
        holder.wait()
    release(tmp_path)  # not held any more: a no-op


def test_a_requeue_of_the_same_slurm_job_proceeds_another_job_is_refused(tmp_path, monkeypatch):
    holder = _holder(tmp_path, {"SLURM_JOB_ID": "77"})
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        with pytest.raises(RunDirectoryBusy, match="SLURM job 77"):
            acquire(tmp_path)
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # e.g. the dead allocation's NFS lock not yet released
        with run_directory_lock(tmp_path):
            pass
    finally:
        holder.stdin.close()
        holder.wait()


def test_ranks_launched_by_the_holder_do_not_take_the_lock(tmp_path):
    holder = _holder(tmp_path)
    try:
        with run_directory_lock(tmp_path, take=False):  # what train.run does on a rank other than global zero
            pass
    finally:
        holder.stdin.close()
        holder.wait()


ORPHANED = """
import os, sys, time
from framework.checkpointing.run_lock import acquire
acquire(sys.argv[1])
if os.fork() == 0:  # like a data loader worker: inherits the locked file, outlives its killed parent briefly
    time.sleep(2)
    os._exit(0)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_killed_holder_whose_forked_worker_still_holds_the_lock_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", ORPHANED, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_directory_lock(tmp_path):  # the worker exits 2 s after its fork; the resume goes ahead then
        pass
