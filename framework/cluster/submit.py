"""Submit a training run to SLURM: compose the config, render a batch script, save both, call sbatch (the library of
``fw-submit``, ``framework.commands.submit``).

    fw-submit cluster.nodes=4 cluster.devices_per_node=8 cluster.partition=gpu model=gpt2-small name=gpt2-4n
    fw-submit --dry-run name=smoke trainer.max_steps=10        # print the script, submit nothing
    python3 -m framework submit ...                             # the same without the console scripts

The overrides are composed with conf/train.yaml exactly as ``fw-train`` would compose them (``cluster=slurm``
is added when no cluster is named), validated, and passed unchanged to ``python -m framework train`` inside
the script, so every task composes the same config. ``runs/<name>/`` gets ``job.sbatch`` and ``config.yaml``;
the run directory has no timestamp, so a requeued job finds its checkpoints there and resumes.

Nothing is written before ``sbatch`` is found on PATH; the two files are written under the run directory's
lock (framework/checkpointing/run_lock.py), so a submission never rewrites the script of a run still going; a
submission that sbatch refuses leaves the directory as it found it. Every user error is one line and exit 2.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template

from omegaconf import DictConfig, OmegaConf, open_dict

from framework.cluster.config import ClusterConfig
from framework.config import CONF_DIR, TrainConfig, compose_config, to_run_config
from framework.checkpointing.run_lock import run_directory_lock

TEMPLATE_DIR = CONF_DIR.parent / "slurm"


@dataclass
class Submission:
    script: str  # the rendered batch script
    run_dir: Path
    job_id: str | None = None  # None for a dry run


def compose(overrides: list[str]) -> DictConfig:
    """conf/train.yaml composed with ``overrides``, with its ``hydra`` node (the run directory)."""
    return compose_config(overrides, hydra_config=True)


def with_cluster(overrides: list[str]) -> list[str]:
    if any(o.lstrip("+~").startswith("cluster=") for o in overrides):
        return list(overrides)
    return ["cluster=slurm", *overrides]


def _check(cfg: TrainConfig) -> None:
    c, t = cfg.cluster, cfg.trainer
    if c.name != "slurm":
        raise ValueError(f"submitting needs cluster=slurm, got cluster={c.name}; drop the cluster override.")
    if str(t.devices) != str(c.devices_per_node):
        raise ValueError(f"trainer.devices={t.devices} differs from cluster.devices_per_node={c.devices_per_node}; "
                         "Lightning needs one SLURM task per device: set cluster.devices_per_node only.")
    if t.num_nodes != c.nodes:
        raise ValueError(f"trainer.num_nodes={t.num_nodes} differs from cluster.nodes={c.nodes}; set cluster.nodes only.")


def _sbatch_option(line: str) -> str:
    line = line.strip()
    return line if line.startswith("#SBATCH") else f"#SBATCH {line if line.startswith('-') else '--' + line}"


def _socket_ifname(ifname: str) -> str:
    """Export lines that pin NCCL's and gloo's sockets to one network interface ("" leaves both to choose)."""
    if not ifname:
        return "# cluster.socket_ifname unset: NCCL and gloo choose their network interface themselves"
    name = shlex.quote(ifname)
    return f"export NCCL_SOCKET_IFNAME={name} GLOO_SOCKET_IFNAME={name}"


def render(cfg: TrainConfig, overrides: list[str], run_dir: Path, workdir: Path) -> str:
    """The batch script for this config: slurm/single_node.sbatch or slurm/multi_node.sbatch, filled in."""
    c: ClusterConfig = cfg.cluster
    optional = []
    for flag, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos), ("mem", c.mem)):
        if value:
            optional.append(f"#SBATCH --{flag}={value}")
    if cfg.trainer.accelerator != "cpu":
        optional.append(f"#SBATCH --gpus-per-node={c.devices_per_node}")
    optional += [_sbatch_option(line) for line in c.extra_sbatch]
    command = [c.python, "-m", "framework", "train", *overrides]
    values = dict(
        job_name=c.job_name or cfg.name, nodes=c.nodes, ntasks_per_node=c.devices_per_node,
        cpus_per_task=c.cpus_per_task, time=c.time, output=str(run_dir / "slurm-%j.out"),
        signal_seconds=c.signal_seconds, requeue_line="#SBATCH --requeue" if c.requeue else "#SBATCH --no-requeue",
        optional_sbatch="\n".join(optional), workdir=shlex.quote(str(workdir)),
        environment="\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items()),
        setup="\n".join(c.setup), command=shlex.join(command), socket_ifname=_socket_ifname(c.socket_ifname),
    )
    template = "single_node.sbatch" if c.nodes == 1 else "multi_node.sbatch"
    return Template((TEMPLATE_DIR / template).read_text()).substitute(values)


class SubmitError(ValueError):
    """A submission that cannot go ahead (no sbatch, sbatch refused the script); the message is one sentence."""


def _find_sbatch(command: str) -> str:
    found = shutil.which(command)
    if found is None:
        raise SubmitError(f"cluster.sbatch={command!r} is not an executable on PATH, so nothing was submitted or "
                          "written; run fw-submit on a SLURM login node, set cluster.sbatch to the path of sbatch, "
                          "or use --dry-run to print the script.")
    return found


def _write_job_files(run_dir: Path, files: dict[str, str]) -> None:
    """Write ``files`` into ``run_dir`` under its run lock (``RunDirectoryBusy`` while a run holds it)."""
    with run_directory_lock(run_dir):
        for name, text in files.items():
            (run_dir / name).write_text(text)


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (what a submission would create)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _restore(run_dir: Path, previous: dict[str, bytes | None], created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for name, content in previous.items():
        if content is None:
            (run_dir / name).unlink(missing_ok=True)
        else:
            (run_dir / name).write_bytes(content)


def submit(overrides: list[str], dry_run: bool = False, workdir: Path | None = None) -> Submission:
    """Compose, validate, render; unless ``dry_run``, write runs/<name>/{job.sbatch,config.yaml} and sbatch it."""
    workdir = Path(workdir or Path.cwd()).resolve()
    overrides = with_cluster(overrides)
    composed = compose(overrides)
    run_dir_pattern = str(composed.hydra.run.dir)
    with open_dict(composed):
        del composed["hydra"]
    cfg = to_run_config(composed)
    _check(cfg)
    run_dir = Path(cfg.run_dir or run_dir_pattern)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    script = render(cfg, overrides, run_dir, workdir)
    if dry_run:
        return Submission(script=script, run_dir=run_dir)
    sbatch = _find_sbatch(cfg.cluster.sbatch)
    created = _first_missing(run_dir)
    files = {"job.sbatch": script, "config.yaml": OmegaConf.to_yaml(composed, resolve=True)}
    previous = {name: (run_dir / name).read_bytes() if (run_dir / name).exists() else None for name in files}
    try:
        _write_job_files(run_dir, files)
    except OSError:  # a full disk, no permission: put back what was there
        _restore(run_dir, previous, created)
        raise
    # the lock is released before sbatch: the job's first task takes it as it starts, possibly at once
    result = subprocess.run([sbatch, "--parsable", str(run_dir / "job.sbatch")], cwd=workdir,
                            capture_output=True, text=True)
    if result.returncode != 0:
        _restore(run_dir, previous, created)
        reason = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise SubmitError(f"sbatch refused the job of {run_dir} ({reason}); nothing was submitted: fix the cluster.* "
                          "setting it names and submit again.")
    job_id = result.stdout.strip().split(";")[0]  # --parsable prints "<id>[;<cluster>]"
    return Submission(script=script, run_dir=run_dir, job_id=job_id)
