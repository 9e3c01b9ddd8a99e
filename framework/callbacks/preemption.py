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

SIGTERM (what schedulers and Kubernetes send before SIGKILL) and SIGINT (Ctrl+C) take the same path without
the requeue: checkpoint at the next step boundary, stop, and exit with ``128 + signal number`` (143 for
SIGTERM, 130 for SIGINT, the shell's convention), so ``fw-train && fw-export`` does not go on with an
unfinished model. A second Ctrl+C stops at once (KeyboardInterrupt, no checkpoint). Lightning (2.6) installs
its own SIGTERM handler in ``Trainer._run`` after the callbacks' ``setup``: it forwards the signal to the
processes its launcher started, runs a ``dist.broadcast`` inside the handler (a collective only the signalled
rank joins) and makes the loop raise ``SIGTERMException``, a ``SystemExit`` with status 0. The handlers here
are installed again in ``on_train_start``, after Lightning's, so Lightning's never runs during training.
A run whose requeue signal was turned into ``scontrol requeue`` exits 0 on every rank (the job goes on in
its requeued incarnation; a non-zero task status would make ``srun --kill-on-bad-exit`` kill rank 0 before
it requeues).
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
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2")  # checkpoint, stop and requeue (SLURM)
STOP_SIGNALS = ("SIGTERM", "SIGINT")  # checkpoint and stop; the process exits 128 + signal number


def signal_exit_status(sig: signal.Signals) -> int:
    """The exit status of a run stopped by ``sig``: 128 + its number, as a shell reports a process killed by it."""
    return 128 + int(sig)


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
    """On a preemption signal: checkpoint at the next optimizer-step boundary, stop, then requeue (SLURM).
    ``signals`` requeue the job after the checkpoint; ``stop_signals`` (not also in ``signals``) only stop it."""

    FILENAME = "preempted-step{step:07d}.ckpt"

    def __init__(self, checkpoint_dir: str | Path, signals: tuple[str | int, ...] = DEFAULT_SIGNALS,
                 requeue: bool = True, check_every_n_steps: int = 1,
                 stop_signals: tuple[str | int, ...] = STOP_SIGNALS) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"cluster.preemption_check_every_n_steps={check_every_n_steps} must be at least 1.")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.check_every_n_steps = check_every_n_steps
        self.signals = tuple(parse_signal(s) for s in signals)
        self.stop_signals = tuple(s for s in map(parse_signal, stop_signals) if s not in self.signals)
        self.requeue_enabled = requeue
        self.signal_received = False  # set by the handler, possibly on one rank only
        self.received: signal.Signals | None = None  # the first signal this process got
        self.stop_signal: signal.Signals | None = None  # the signal that stopped the run, the same on every rank
        self.preempted = False  # all ranks agreed, the checkpoint is saved and the trainer stopped
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._last_step = -1

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, frame: Any) -> None:
        # nothing else: the checkpoint is written at a step boundary. A second Ctrl+C stops at once.
        if signum == signal.SIGINT and self.signal_received:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:  # os.write: print() is not safe inside a handler that may interrupt it
            os.write(2, b"\nCtrl+C: saving a checkpoint at the next optimizer step, then stopping "
                        b"(press Ctrl+C again to stop at once, without it)\n")
        self.received = self.received or signal.Signals(signum)
        self.signal_received = True

    def _install(self) -> None:
        """Point every handled signal at ``_handler``; the handlers found the first time are kept for teardown."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals + self.stop_signals:
            previous = signal.signal(sig, self._handler)
            self._previous_handlers.setdefault(sig, previous)

    def _restore(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when fit raises, and its own teardown, which runs next, restores the
        # handlers it found (ours): point it at the ones from before ``setup``
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector._original_handlers.update(self._previous_handlers)
        self._restore()

    # ------------------------------------------------------------------ step boundary
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous_handlers:
            self._install()  # again: Lightning's SignalConnector replaced the SIGTERM handler after setup
            connector = getattr(trainer, "_signal_connector", None)
            if connector is not None and self.signal_received:  # a SIGTERM during the restore reached it too:
                connector.received_sigterm = False  # its loop would raise SystemExit(0) after our checkpoint
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
        self.stop_signal = self.agree_on_signal(trainer)
        path = self.checkpoint_dir / self.FILENAME.format(step=step)
        rank_zero_info(f"preemption signal received: saving {path} at step {step} and stopping "
                       f"({self.stop_signal.name})")
        older = [p for p in self.checkpoint_dir.glob("preempted-step*.ckpt") if p != path]
        trainer.should_stop = True  # before the save: Lightning then logs this step's row, written before it
        trainer.save_checkpoint(str(path))  # returns once every rank's part is written
        for previous in older:
            trainer.strategy.remove_checkpoint(previous)  # rank 0 only
        self.preempted = True

    def agree_on_signal(self, trainer: L.Trainer) -> signal.Signals | None:
        """The signal that stops the run, the same on every rank (a collective: every rank calls it): a stop
        signal any rank received, else a requeue signal any rank received, else None. Ranks get signals at
        different times or not at all (Kubernetes signals only the container's first process)."""
        own = torch.tensor(int(self.received or 0), device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(own) if trainer.world_size > 1 else own
        received = [signal.Signals(n) for n in gathered.flatten().tolist() if n]  # in rank order
        stops = [s for s in received if s in self.stop_signals]
        return (stops or received or [None])[0]

    def exit_status(self, trainer: L.Trainer, requeued: bool) -> int:
        """0 when the run was not stopped by a signal or its job was requeued; else 128 + the signal number.
        Under SLURM with requeue on, ranks other than 0 exit 0 after a requeue signal: rank 0 decides, and a
        non-zero task would make ``srun --kill-on-bad-exit`` end rank 0 before its ``scontrol requeue``."""
        if self.stop_signal is None or requeued:
            return 0
        requeue_path = self.stop_signal in self.signals and self.requeue_enabled and slurm_job_id()
        if requeue_path and not trainer.is_global_zero:
            return 0
        return signal_exit_status(self.stop_signal)

    # ------------------------------------------------------------------ after fit
    def requeue(self, trainer: L.Trainer) -> bool:
        """Rank 0 asks SLURM to requeue this job; True when the job was requeued. Call after ``fit`` returns."""
        if not (self.stop_signal in self.signals and self.requeue_enabled and trainer.is_global_zero):
            return False  # not stopped by a requeue signal (the checkpoint is saved when stop_signal is set)
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
