"""Submit a training run to SLURM: compose the config, render a batch script, save both, call sbatch.

    fw-submit cluster.nodes=4 cluster.devices_per_node=8 cluster.partition=gpu model=gpt2-small name=gpt2-4n
    fw-submit --dry-run name=smoke trainer.max_steps=10        # print the script, submit nothing
    python3 -m framework.submit ...                             # the same without installing the package

The overrides are composed with conf/train.yaml exactly as ``fw-train`` would compose them (``cluster=slurm``
is added when no cluster is named), validated, and passed unchanged to ``python -m framework.train`` inside
the script, so every task composes the same config. ``runs/<name>/`` gets ``job.sbatch`` and ``config.yaml``;
the run directory has no timestamp, so a requeued job finds its checkpoints there and resumes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from omegaconf import DictConfig, OmegaConf, open_dict

from framework.cluster.config import ClusterConfig
from framework.config import TrainConfig, compose_config, to_run_config

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
TEMPLATE_DIR = REPO / "slurm"


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
    command = [c.python, "-m", "framework.train", *overrides]
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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.sbatch").write_text(script)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed, resolve=True))
    result = subprocess.run([cfg.cluster.sbatch, "--parsable", str(run_dir / "job.sbatch")], cwd=workdir,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch refused {run_dir / 'job.sbatch'}: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable prints "<id>[;<cluster>]"
    return Submission(script=script, run_dir=run_dir, job_id=job_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fw-submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fw-train")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        sub = submit(args.overrides, dry_run=args.dry_run)
    except (ValueError, RuntimeError, FileNotFoundError, HydraException, OmegaConfBaseException) as err:
        sys.exit(f"fw-submit: {err}")
    if args.dry_run:
        print(sub.script)
    else:
        print(f"submitted job {sub.job_id}; run directory {sub.run_dir}")


if __name__ == "__main__":
    main()
