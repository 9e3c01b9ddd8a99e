"""Typed schema for the ``cluster`` config group: where a run executes and, for SLURM, what to request.

``cluster=local`` runs in this process (``fw-train``). ``cluster=slurm`` sets ``trainer.num_nodes`` and
``trainer.devices`` from ``cluster.nodes`` and ``cluster.devices_per_node`` (conf/cluster/slurm.yaml), and
``fw-submit`` renders a batch script from these fields (framework/cluster/submit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from framework.choices import ClusterName


@dataclass
class ClusterConfig:
    name: ClusterName = "local"  # local | slurm
    nodes: int = 1
    devices_per_node: int = 1  # SLURM tasks per node; Lightning needs it equal to trainer.devices
    cpus_per_task: int = 8
    mem: str = ""  # --mem per node, e.g. "200G" or "0" (all); "" leaves the site default
    time: str = "24:00:00"  # --time limit, [D-]HH:MM:SS
    partition: str = ""
    account: str = ""
    qos: str = ""
    job_name: str = ""  # "" = the run's name
    signal_seconds: int = 120  # --signal=USR1@N: warning before the time limit (SLURM may send it up to 60 s early)
    requeue: bool = True  # --requeue, and `scontrol requeue` after a preemption checkpoint
    # signals that mean "checkpoint at the next step and requeue" (USR1: our sbatch; USR2: submitit)
    requeue_signals: list[str] = field(default_factory=lambda: ["USR1", "USR2"])
    # with several ranks, agreeing on a received signal is an all-reduce the host waits for (it drains the GPU's
    # queue), so it happens every N optimizer steps; N x step time must stay well inside signal_seconds
    preemption_check_every_n_steps: int = 10
    # network interface for NCCL's and gloo's sockets (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME), e.g. "ib0" or
    # "lo"; "" lets them choose, which on nodes with several interfaces can pick one the other nodes cannot reach
    socket_ifname: str = ""
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--constraint=h100"]
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. ["module load cuda/12.4"]
    env: dict[str, str] = field(default_factory=dict)  # exported in the batch script, e.g. {NCCL_DEBUG: WARN}
    python: str = "python3"  # interpreter on the compute nodes
    sbatch: str = "sbatch"  # submission command

    def __post_init__(self) -> None:
        if self.name not in ("local", "slurm"):
            raise ValueError(f"cluster={self.name!r} is not one of: local, slurm.")
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"cluster.nodes={self.nodes} and cluster.devices_per_node={self.devices_per_node} "
                             "must both be at least 1.")


def slurm_time_minutes(time: str) -> int:
    """SLURM's ``--time`` format (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) -> minutes."""
    text = str(time).strip()
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    if len(parts) > 3 or any(p < 0 for p in parts):
        raise ValueError(f"cluster.time={time!r} is not a SLURM time; use HH:MM:SS or D-HH:MM:SS.")
    total = (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)
    return max(1, total)


# For conf/hydra/launcher/slurm.yaml: ${slurm_minutes:${cluster.time}} is hydra-submitit-launcher's
# timeout_min; ${or_null:${cluster.partition}} turns an unset ("") option into null, which submitit omits.
OmegaConf.register_new_resolver("slurm_minutes", slurm_time_minutes, replace=True)
OmegaConf.register_new_resolver("or_null", lambda value: value if value not in ("", None) else None, replace=True)
