"""Graceful preemption: a signal sets a flag; the checkpoint is written at the next optimizer-step boundary.

SLURM warns a job before it is preempted or reaches its time limit (``#SBATCH --signal=USR1@<seconds>``;
submitit uses USR2). A signal handler may run between any two bytecodes, e.g. in the middle of an
optimizer step or of another checkpoint write, so the handler here only sets a flag. At the end of the
next training batch that completed an optimizer step, the ranks agree on the flag (an all-reduce: the
signal reaches ranks at slightly different times), every rank takes part in saving
``preempted-step{step:07d}.ckpt`` through the strategy's checkpoint path (atomic for single files), and
the trainer stops. With more than one rank the agreement is a collective whose result the host must read,
which stalls the GPU's queue, so it runs only every ``check_every_n_steps`` optimizer steps (a single
process reads its own flag every step for free); keep that many steps well inside SLURM's warning time
(``--signal=USR1@<seconds>``). The step in the name lets resume discovery rank it without opening it (sharded
checkpoints cannot always be read without unpickling); older preemption checkpoints are removed once
the new one is complete. After ``trainer.fit`` returns, the
train entry calls ``requeue()``: rank 0 runs ``scontrol requeue $SLURM_JOB_ID``, SLURM puts the job back
in the queue, and the requeued job resumes from the newest complete checkpoint in the same run directory.

Lightning's own SLURM auto-requeue saves its checkpoint inside the signal handler; the train entry
turns it off (``SLURMEnvironment(auto_requeue=False)``), so Lightning installs no USR1 handler of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2")


def parse_signal(name: str | int) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"`` or ``10`` -> ``signal.SIGUSR1``."""
    if isinstance(name, int) or str(name).isdigit():
        return signal.Signals(int(name))
    key = str(name).upper()
    key = key if key.startswith("SIG") else "SIG" + key
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"{name!r} is not a signal name; use e.g. USR1 or USR2.") from None


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCallback(L.Callback):
    """On a preemption signal: checkpoint at the next optimizer-step boundary, stop, then requeue (SLURM)."""

    FILENAME = "preempted-step{step:07d}.ckpt"

    def __init__(self, checkpoint_dir: str | Path, signals: tuple[str | int, ...] = DEFAULT_SIGNALS,
                 requeue: bool = True, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"cluster.preemption_check_every_n_steps={check_every_n_steps} must be at least 1.")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.check_every_n_steps = check_every_n_steps
        self.signals = tuple(parse_signal(s) for s in signals)
        self.requeue_enabled = requeue
        self.signal_received = False  # set by the handler, possibly on one rank only
        self.preempted = False  # all ranks agreed, the checkpoint is saved and the trainer stopped
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._last_step = -1

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, frame: Any) -> None:
        self.signal_received = True  # nothing else: the checkpoint is written at a step boundary

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous_handlers[sig] = signal.signal(sig, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # ------------------------------------------------------------------ step boundary
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored on resume; an optimizer step moves it

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a gradient-accumulation micro-batch: no optimizer step happened
            return
        self._last_step = step
        if trainer.world_size > 1 and step % self.check_every_n_steps:
            return  # the same steps are skipped on every rank: global_step agrees across ranks
        # every rank reaches this point once per optimizer step, so the collective cannot deadlock
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        path = self.checkpoint_dir / self.FILENAME.format(step=step)
        rank_zero_info(f"preemption signal received: saving {path} at step {step} and stopping")
        older = [p for p in self.checkpoint_dir.glob("preempted-step*.ckpt") if p != path]
        trainer.save_checkpoint(str(path))  # returns once every rank's part is written
        for previous in older:
            trainer.strategy.remove_checkpoint(previous)  # rank 0 only
        self.preempted = True
        trainer.should_stop = True

    # ------------------------------------------------------------------ after fit
    def requeue(self, trainer: L.Trainer) -> bool:
        """Rank 0 asks SLURM to requeue this job; True when the job was requeued. Call after ``fit`` returns."""
        if not (self.preempted and self.requeue_enabled and trainer.is_global_zero):
            return False
        job_id = slurm_job_id()
        if not job_id:
            rank_zero_info("preempted outside SLURM: checkpoint saved; rerun the same command to resume")
            return False
        _flush_wandb()
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            rank_zero_warn(f"`scontrol requeue {job_id}` failed ({result.stderr.strip()}); the checkpoint is "
                           "saved: resubmit the same command to resume.")
            return False
        rank_zero_info(f"requeued SLURM job {job_id}")
        return True


def _flush_wandb() -> None:
    """Shut wandb's service down so its run files are complete: right after ``scontrol requeue`` SLURM
    terminates every process of the job, the service included."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()
