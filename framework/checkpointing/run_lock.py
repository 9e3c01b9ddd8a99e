"""One run per run directory: an exclusive ``flock`` on ``<run_dir>/.run.lock`` for the run's whole life.

Two jobs started with the same ``name=`` would otherwise write into one ``runs/<name>/``: checkpoints come
out as ``last.ckpt`` / ``last-v1.ckpt``, one job crashes, and the next ``resume=auto`` picks from the mix.

Why ``fcntl.flock``: the kernel releases the lock when its holder dies, even by SIGKILL, so a lock file left
by a killed job never blocks the resume. The holder's host, pid and SLURM job id are written inside the file
only so that a refused job can say who holds the directory. Processes the holder forked (data loader workers)
share its open file and so the lock: when the recorded holder on this host is dead, the next run waits up to
``ORPHAN_WAIT_S`` for them to exit instead of refusing. Only the launching process (global rank 0) takes
the lock; the ranks it launches, and srun's other tasks of the same job, share it without locking. A
requeued SLURM job keeps its ``SLURM_JOB_ID``: when the lock is still held under that id (a lock of the
previous, dead allocation not yet released by a network file system) the job is the same and proceeds.

File systems: flock works on local disks and on NFS (emulated with POSIX byte-range locks, across hosts);
Lustre needs the ``flock`` mount option, else ``flock`` fails with ENOSYS/EOPNOTSUPP and the run proceeds
unlocked with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".run.lock"
ORPHAN_WAIT_S = 30.0  # how long a dead holder's forked children may keep the lock (workers exit within seconds)
_HELD: dict[str, list] = {}  # resolved run dir -> [file descriptor, nesting depth] held by this process


class RunDirectoryBusy(ValueError):
    """Another job holds the run directory; the message names it (host, pid, SLURM job id)."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another process (its owner record is unreadable)"
    slurm = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{slurm}, started {owner.get('started')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_orphans(fd: int, owner: dict, timeout_s: float = ORPHAN_WAIT_S) -> bool:
    """True once the lock is ours. When its recorded holder on this host has died, processes it forked (data
    loader workers inherit the lock's open file) may hold it a few seconds longer: wait for them to exit."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int) or _alive(owner["pid"]):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            continue
    return False


def _write_owner(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_owner()).encode())
    os.fsync(fd)


def acquire(run_dir: Path) -> None:
    """Take (or re-enter) the lock of ``run_dir``; raises ``RunDirectoryBusy`` when another job holds it."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    Path(key).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(key) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            print(f"warning: {key} is on a file system without flock; two runs with this name would not be "
                  f"stopped from sharing it.", file=sys.stderr)
        elif err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            owner = _read_owner(fd)
            job = os.environ.get("SLURM_JOB_ID")
            same_job = bool(job) and owner.get("slurm_job_id") == job  # a requeue of the same SLURM job proceeds
            if not same_job and not _wait_for_orphans(fd, owner):
                os.close(fd)
                raise RunDirectoryBusy(
                    f"run directory {key} is in use by {_describe(owner)}; wait for that run to end or stop it, "
                    f"or start this one with another name=.") from None
        else:
            os.close(fd)
            raise
    _write_owner(fd)
    _HELD[key] = [fd, 1]


def release(run_dir: Path) -> None:
    key = str(Path(run_dir).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.close(held[0])  # closing the last descriptor releases the flock


@contextmanager
def run_directory_lock(run_dir: Path, take: bool = True) -> Iterator[None]:
    """Hold the lock of ``run_dir`` inside the block (re-entrant in one process). ``take=False`` (a rank
    launched by the locking process) does nothing: the whole job shares rank 0's lock."""
    if not take:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
