"""SLURM submission and preemption against a real local SLURM (tests/slurm_cluster.py).

Jobs are rendered and submitted by framework.cluster.submit exactly as ``fw-submit`` does, and run 2-task DDP on the
CPU through the rendered script's ``srun``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY
from framework.checkpointing.checkpoints import find_resume_checkpoint, is_complete, safe_load
from framework.cluster.submit import compose, submit
from slurm_cluster import JOB_TIMEOUT, _free_port, slurm_cluster  # noqa: F401  (the fixture)
from test_wandb import read_offline_run

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slurm]
# wandb's system-metrics sampler and machine probe cost ~10 CPU-seconds per session; the test needs neither
WANDB_LIGHT = [f"+cluster.env.WANDB__DISABLE_{key}=true" for key in ("STATS", "META", "MACHINE_INFO")]


def _overrides(data_cache: str, name: str, *extra: str, port: int | None = None) -> list[str]:
    # MASTER_PORT: the batch script derives it from the job id otherwise, and job ids restart at 1 per cluster
    # (concurrent test sessions on one machine would collide)
    return [*TINY, f"data.cache_dir={data_cache}", f"name={name}", "cluster=slurm", "cluster.devices_per_node=2",
            "cluster.cpus_per_task=1", "cluster.time=01:00:00", "strategy=ddp", "torch_threads=1",
            f"+cluster.env.PYTHONPATH={REPO}", f"+cluster.env.MASTER_PORT={port or _free_port()}",
            "trainer.log_every_n_steps=1", "data.val_windows=8", *extra]


@pytest.fixture
def job_env(slurm_cluster, monkeypatch):  # noqa: F811
    for key, value in slurm_cluster.env.items():
        if key == "SLURM_CONF":
            monkeypatch.setenv(key, value)  # sbatch, called by framework.cluster.submit, finds the test cluster
    return slurm_cluster


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run_dir.glob("slurm-*.out")))


def _diagnosis(cluster, run_dir: Path, fields: dict) -> str:
    ctld = (cluster.directory / "slurmctld.log").read_text().splitlines()[-25:]
    return f"job {fields}\n--- job output\n{_log(run_dir)[-3000:]}\n--- slurmctld.log\n" + "\n".join(ctld)


def _steps_and_losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_dry_run_renders_the_batch_script_from_the_config(tmp_path, data_cache):
    sub = submit(_overrides(data_cache, "render", "cluster.nodes=3", "cluster.partition=gpu", "cluster.account=lm",
                            "trainer.accelerator=gpu", "cluster.signal_seconds=300", "cluster.extra_sbatch=[exclusive]"),
                 dry_run=True, workdir=tmp_path)
    script = sub.script
    assert sub.run_dir == tmp_path / "runs" / "render" and not sub.run_dir.exists()
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=2", "#SBATCH --requeue", "#SBATCH --signal=USR1@300",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=gpu", "#SBATCH --account=lm",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --exclusive", "#SBATCH --time=01:00:00"):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "-m framework train" in srun and "name=render" in srun and "cluster.nodes=3" in srun
    # the rendezvous is the allocation's first node; NODE_RANK is per task (the script runs on node 0 only)
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export NODE_RANK=$SLURM_NODEID; exec" in srun and "export NODE_RANK" not in script.replace(srun, "")
    assert script.index("unset RANK") < script.index("export MASTER_PORT=")  # stale values cleared first
    pinned = submit(_overrides(data_cache, "lo", "cluster.nodes=2", "cluster.socket_ifname=lo"), dry_run=True,
                    workdir=tmp_path).script
    assert "export NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo" in pinned.splitlines()
    assert "SOCKET_IFNAME=" not in script.replace("socket_ifname", "")  # unset: NCCL and gloo choose
    # every #SBATCH line precedes the first command, or sbatch would ignore it
    lines = [line for line in script.splitlines() if line.strip()]
    first_command = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    with pytest.raises(ValueError, match="trainer.devices=4 differs"):
        submit(_overrides(data_cache, "bad", "trainer.devices=4"), dry_run=True, workdir=tmp_path)


def test_submitit_launcher_config_composes_from_the_cluster_group():
    cfg = compose(["cluster=slurm", "cluster.nodes=2", "cluster.devices_per_node=4", "cluster.time=1-02:30:00",
                   "cluster.partition=gpu", "hydra/launcher=slurm", "name=sweep"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.timeout_min == (24 + 2) * 60 + 30
    assert launcher.partition == "gpu" and launcher.account is None
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2


@pytest.mark.slow
def test_two_task_ddp_job_runs_through_the_rendered_script(job_env, data_cache, tiny_prepared, tmp_path):
    sub = submit(_overrides(data_cache, "ddp", "trainer.max_steps=6"), workdir=tmp_path)
    assert (sub.run_dir / "job.sbatch").read_text() == sub.script and (sub.run_dir / "config.yaml").exists()
    fields = job_env.wait_for(sub.job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=JOB_TIMEOUT)
    log = _log(sub.run_dir)
    assert fields["JobState"] == "COMPLETED", _diagnosis(job_env, sub.run_dir, fields)
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # both srun tasks joined one process group
    metrics = json.loads((sub.run_dir / "final_metrics.json").read_text())
    assert metrics["step"] == 6
    assert metrics["tokens_seen"] == 6 * 2 * 8 * 64  # steps x ranks x micro-batch x seq_len


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_finishes_with_every_step_once(job_env, data_cache, tiny_prepared, tmp_path):
    max_steps = 60
    sub = submit(_overrides(data_cache, "preempt", f"trainer.max_steps={max_steps}", "callbacks.checkpoint_every_n_steps=10",
                            "trainer.val_check_interval=1000", "cluster.preemption_check_every_n_steps=3", "logger.wandb=true", "logger.wandb_mode=offline",
                            *WANDB_LIGHT),
                 workdir=tmp_path)
    ckpt_dir = sub.run_dir / "checkpoints"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (ckpt_dir / "step0000010.ckpt").exists() or not is_complete(ckpt_dir / "step0000010.ckpt"):
        state = job_env.job_fields(sub.job_id).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job ended ({state}) before it could be preempted:\n{_log(sub.run_dir)[-3000:]}"
        assert time.monotonic() < deadline, "no step-10 checkpoint in time"
        time.sleep(0.1)
    # SLURM sends USR1 to every task signal_seconds before the limit, not all at the same instant; signal only
    # rank 1 here: rank 0 must still stop at the same step (the ranks all-reduce the flag) and requeue the job
    os.kill(int(job_env.tasks(sub.job_id)[1]["pid"]), signal.SIGUSR1)

    fields = job_env.wait_for(sub.job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=JOB_TIMEOUT)
    log = _log(sub.run_dir)
    assert fields["JobState"] == "COMPLETED", _diagnosis(job_env, sub.run_dir, fields)
    assert fields["Restarts"] == "1", _diagnosis(job_env, sub.run_dir, fields)  # requeued once, by the job itself
    assert "preemption signal received" in log and f"requeued SLURM job {sub.job_id}" in log
    preempted_at = int(log.split("preemption signal received: saving")[1].split("at step ")[1].split()[0])
    assert 10 <= preempted_at < max_steps and preempted_at % 3 == 0  # the ranks agree every 3rd step only
    assert "restart 1" in log and f"resuming from {ckpt_dir / f'preempted-step{preempted_at:07d}.ckpt'}" in log

    steps = [s for s, _ in _steps_and_losses(sub.run_dir)]
    assert steps == list(range(max_steps))  # every optimizer step exactly once: no gaps, no repeats
    metrics = json.loads((sub.run_dir / "final_metrics.json").read_text())
    assert metrics["step"] == max_steps and metrics["tokens_seen"] == max_steps * 2 * 8 * 64  # no step trained twice

    run_id = safe_load(find_resume_checkpoint(ckpt_dir))["wandb_run_id"]
    assert run_id == (sub.run_dir / "wandb_run_id.txt").read_text().strip()
    sessions = sorted((sub.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 2 and {p.name for p in sessions} == {f"run-{run_id}.wandb"}  # one run, two sessions
    wandb_steps = []
    for session in sessions:  # both sessions' files are complete: wandb finished before the requeue
        info, history = read_offline_run(session, timeout_s=10)
        assert info["id"] == run_id
        wandb_steps += [int(h["trainer/global_step"]) for h in history if "train/loss" in h]
    assert wandb_steps == list(range(max_steps))
