"""A real two-node SLURM cluster on one machine for tests: Debian's slurmctld + 2 x slurmd + munge.

The fixture installs the packages when they are missing (apt-get, needs root), starts a private munged
(own socket), a controller and two compute nodes on free ports with state in a fresh directory, and stops
them all by pid afterwards. Where SLURM cannot be installed or started the tests skip with the reason,
which ``pytest -ra`` prints. Job ids start at a random multiple of 1000 and tasks are told apart by their
SLURM_CONF (``SlurmCluster.tasks``): several test sessions may run clusters on one machine at once.

The nodes are two ``slurmd`` started with ``-N <name>``, each listening on its own loopback address
(127.0.0.2, 127.0.0.3; Linux routes all of 127.0.0.0/8 to ``lo``) and port. Their names, unique to the
session, are added to /etc/hosts while the cluster runs, because jobs resolve the first node's name
(``scontrol show hostnames``) into MASTER_ADDR. Both "nodes" share this machine's file system and CPUs;
each declares ``CPUS_PER_NODE`` CPUs (oversubscribing a small machine) so a 2 x 2-task job and a
1 x 4-task job fit.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch"]

SLURM_CONF = """\
ClusterName=fwtest
FirstJobId={first_job_id}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmdParameters=config_overrides
NodeName=DEFAULT CPUs={cpus} RealMemory=1000 State=UNKNOWN
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
NODE_ADDRESSES = ("127.0.0.2", "127.0.0.3")  # loopback only: nothing outside this machine is reachable
# a ceiling for one test job (seconds) on a loaded 2-core machine, where a 4-rank job can take minutes;
# a passing test never waits for it, so it is generous rather than tight
JOB_TIMEOUT = 900
CPUS_PER_NODE = 4  # declared (SlurmdParameters=config_overrides accepts more than the machine has)
HOSTS = Path("/etc/hosts")


def _free_port() -> int:
    """A port no socket on this machine is bound to, below Linux's ephemeral range (32768-60999).

    A port from ``bind(0)`` comes from the ephemeral range, where the kernel also picks the local ports of
    outgoing connections: between the test picking it and a job binding it (seconds, minutes after a
    requeue) any connection may take it. Random choice keeps concurrent sessions apart."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def _install() -> str | None:
    """Install SLURM and munge if missing; the reason it cannot be done, or None."""
    if all(os.path.exists(p) for p in DAEMONS):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root (apt-get install " + " ".join(PACKAGES) + ")"
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and this machine has no apt-get to install Debian's packages"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:  # empty or stale package lists: update once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not all(os.path.exists(p) for p in DAEMONS):
        return f"apt-get could not install SLURM: {result.stderr.strip()[-300:]}"
    return None


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(pid_files: list[Path], timeout: float = 15.0) -> None:
    """SIGTERM the daemons named by ``pid_files`` together, wait for them, SIGKILL what is left."""
    pids = [pid for pid in map(_pid, pid_files) if pid is not None]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        pids = alive
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class SlurmCluster:
    directory: Path
    env: dict  # os.environ plus SLURM_CONF
    nodes: list[str]  # node names, in NODE_ADDRESSES order

    def tasks(self, job_id: str) -> list[dict[str, str]]:
        """The initial environment (plus "pid") of every ``python -m framework train`` task of a job of this cluster,
        by rank.
        All nodes are this machine; SLURM_CONF tells this cluster's tasks from another test session's."""
        tasks = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            argv = cmdline.split(b"\0")
            is_python = Path(argv[0].decode(errors="replace")).name.startswith("python")
            if not (is_python and argv[1:4] == [b"-m", b"framework", b"train"]):
                continue  # the batch shell and srun carry SLURM_PROCID=0 and the command line as well
            env = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
            if (env.get("SLURM_JOB_ID") == job_id and "SLURM_PROCID" in env
                    and env.get("SLURM_CONF") == self.env["SLURM_CONF"]):
                tasks.append({**env, "pid": pid})
        return sorted(tasks, key=lambda env: int(env["SLURM_PROCID"]))

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def job_fields(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, Reason, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def poll(self, job_id: str) -> dict[str, str]:
        """The job's fields; a job requeued and held for its BeginTime (~120 s) is released to start now."""
        fields = self.job_fields(job_id)
        if (fields.get("JobState") == "PENDING" and fields.get("Restarts", "0") != "0"
                and fields.get("Reason") == "BeginTime"):
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        return fields

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float, release_requeued: bool = True) -> dict:
        """Poll until the job is in one of ``states``; a requeued job held for its BeginTime is released."""
        deadline = time.monotonic() + timeout
        fields: dict = {}
        while time.monotonic() < deadline:
            fields = self.poll(job_id) if release_requeued else self.job_fields(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} did not reach {states} in {timeout:.0f} s; last seen {fields}")


def _start_daemon(name: str, command: list[str], err_file: Path, env: dict) -> None:
    """Run a self-daemonizing command; its output goes to files, never to pipes the daemon would hold open."""
    with open(err_file, "w") as err:
        result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed to start: {err_file.read_text().strip()[-300:]}")


def _edit_hosts(edit) -> None:
    """Rewrite /etc/hosts in place under an flock (it is often a bind mount, so it cannot be replaced)."""
    with open(HOSTS, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = edit(f.read().splitlines())
        f.seek(0)
        f.truncate()
        f.write("".join(line + "\n" for line in lines))


def _hosts_marker(directory: Path) -> str:
    return f"# fw-slurm-test {directory}"


def _stale(line: str) -> bool:
    """An entry of a cluster whose directory is gone (its test session was killed before it could clean up)."""
    _, sep, directory = line.partition(_hosts_marker(Path("")).rstrip(". "))
    return bool(sep) and not Path(directory.strip()).exists()


def add_hosts(names: list[str], directory: Path) -> None:
    marker = _hosts_marker(directory)
    entries = [f"{addr} {name}  {marker}" for addr, name in zip(NODE_ADDRESSES, names)]
    _edit_hosts(lambda lines: [line for line in lines if not _stale(line)] + entries)


def remove_hosts(directory: Path) -> None:
    marker = _hosts_marker(directory)
    if HOSTS.exists():
        _edit_hosts(lambda lines: [line for line in lines if not line.endswith(marker)])


def node_names(directory: Path) -> list[str]:
    """Names unique to this cluster (letters only before the index, so SLURM's hostlist reads them as one range)."""
    token = "".join(random.Random(str(directory)).choices("abcdefghijklmnopqrstuvwxyz", k=6))
    return [f"fw{token}n{i + 1}" for i in range(len(NODE_ADDRESSES))]


def start_cluster(directory: Path) -> SlurmCluster:
    """Start munged, slurmctld and two slurmd with state in ``directory``; raises RuntimeError on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # munged (user munge) must reach its socket directory
    munge_dir = directory / "munge"
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", str(munge_dir)], check=True)
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "-c", "-f", "-k", "/etc/munge/munge.key"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    socket_path = munge_dir / "munge.sock"
    _start_daemon("munged", ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={socket_path}",
                   f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                   f"--seed-file={munge_dir / 'munged.seed'}"], directory / "munged.err", os.environ)
    (directory / "state").mkdir(exist_ok=True)
    names = node_names(directory)
    for name in names:
        (directory / f"spool-{name}").mkdir(exist_ok=True)
    add_hosts(names, directory)
    nodes = "\n".join(f"NodeName={name} NodeAddr={addr} Port={_free_port()}"
                       for name, addr in zip(names, NODE_ADDRESSES))
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], ctld_port=_free_port(),
                                      slurmd_port=_free_port(), munge_socket=socket_path, d=directory,
                                      cpus=max(CPUS_PER_NODE, os.cpu_count() or 1), nodes=nodes,
                                      first_job_id=random.SystemRandom().randrange(1000, 1_000_000, 1000)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _start_daemon("slurmctld", ["/usr/sbin/slurmctld", "-f", str(conf)], directory / "slurmctld.err", env)
    for name in names:
        _start_daemon(f"slurmd {name}", ["/usr/sbin/slurmd", "-f", str(conf), "-N", name],
                      directory / f"slurmd-{name}.err", env)
    cluster = SlurmCluster(directory=directory, env=env, nodes=names)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).split() == ["idle"] * len(names):
            return cluster
        time.sleep(0.2)
    raise RuntimeError(f"the SLURM nodes did not become idle; see {directory}/slurmctld.log and slurmd-*.log")


def stop_cluster(directory: Path) -> None:
    _stop([*directory.glob("slurmd-*.pid"), directory / "slurmctld.pid"])
    _stop([directory / "munge" / "munged.pid"])
    remove_hosts(directory)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node SLURM cluster (skips with the reason where SLURM cannot be installed)."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="fw-slurm-"))
    try:
        cluster = start_cluster(directory)
    except (RuntimeError, subprocess.SubprocessError, OSError) as err:
        stop_cluster(directory)
        pytest.skip(f"could not start a local SLURM cluster: {err}")
    try:
        yield cluster
    finally:
        stop_cluster(directory)
        shutil.rmtree(directory, ignore_errors=True)
