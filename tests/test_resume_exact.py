"""Exact resume: a run killed mid-step continues from its last complete checkpoint with the losses, data
position and random numbers of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY
from framework.callbacks.preemption import PreemptionCallback
from framework.config import to_run_config
from framework.checkpointing.checkpoints import AtomicCheckpointIO, ResumeStateCallback, find_resume_checkpoint, safe_load
from framework.run import run
from stop_at import StopAt

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- RNG state
class _Noisy(L.LightningModule):
    """Draws torch, numpy and python random numbers in every training step and in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.draws: dict[int, tuple] = {}

    def training_step(self, batch, batch_idx):
        noise = torch.rand(4)
        self.draws[self.global_step] = (noise.tolist(), float(np.random.rand()), random.random())
        return (self.layer(noise) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        torch.rand(16)  # validation consumes random numbers too; training must not notice
        np.random.rand(3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(10_000), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(range(4), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, max_steps: int, resume_state: bool, ckpt_path: str | None = None, stop_at: int | None = None):
    L.seed_everything(0, verbose=False)
    module = _Noisy()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, filename="step{step:07d}", auto_insert_metric_name=False,
                                 every_n_train_steps=4, save_top_k=-1)]
    callbacks += [ResumeStateCallback()] if resume_state else []
    callbacks += [StopAt(stop_at)] if stop_at else []
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], logger=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module.draws


@pytest.mark.parametrize("resume_state", [True, False])
def test_resumed_run_draws_the_same_random_numbers(tmp_path, resume_state):
    full = _fit(tmp_path / "full", 8, resume_state)
    _fit(tmp_path / "part", 8, resume_state, stop_at=4)  # checkpoint at step 4, then a validation, then stop
    ckpt = tmp_path / "part" / "step0000004.ckpt"
    resumed = _fit(tmp_path / "part", 8, resume_state, ckpt_path=str(ckpt))
    assert sorted(resumed) == [4, 5, 6, 7]
    same = [resumed[s] == full[s] for s in range(4, 8)]
    if resume_state:
        assert all(same), "RNG streams differ after resume"
        assert len(safe_load(ckpt)[ResumeStateCallback.RNG_KEY]) == 1  # one state per rank
    else:  # the control: without the saved RNG state the stream restarts from the seed
        assert not any(same)


# ---------------------------------------------------------------------------------------------- preemption
class _SignalledAt(_Noisy):
    """Sends itself SIGUSR1 in the middle of one training step (after its forward pass)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.signal_step = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs right here, mid-step
        return loss


def test_preemption_signal_checkpoints_at_the_next_step_boundary_and_stops(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / "preempted-step0000002.ckpt").write_bytes(b"an older preemption checkpoint")
    preemption = PreemptionCallback(tmp_path)
    trainer = L.Trainer(max_steps=20, callbacks=[preemption, ResumeStateCallback()], plugins=[AtomicCheckpointIO()],
                        logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    module = _SignalledAt(step=3)
    handler_before = signal.getsignal(signal.SIGUSR1)
    trainer.fit(module)
    assert preemption.preempted and trainer.global_step == 4  # finished the interrupted step, then stopped
    assert sorted(module.draws) == [0, 1, 2, 3]
    saved = safe_load(tmp_path / "preempted-step0000004.ckpt")
    assert saved["global_step"] == 4  # written after step 3's optimizer step, not inside the handler
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["preempted-step0000004.ckpt"]
    assert find_resume_checkpoint(tmp_path) == tmp_path / "preempted-step0000004.ckpt"
    assert preemption.requeue(trainer) is False  # outside SLURM: nothing to requeue, rerun to resume
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the flag handler is removed after fit


def test_several_ranks_agree_on_the_signal_only_every_n_steps_one_rank_every_step(tmp_path):
    """The multi-rank agreement is a host-blocking collective: it runs on steps divisible by N only."""
    from types import SimpleNamespace

    calls: list[int] = []

    def make_trainer(world_size):
        trainer = SimpleNamespace(global_step=0, world_size=world_size, should_stop=False)
        trainer.strategy = SimpleNamespace(
            reduce_boolean_decision=lambda flag, all=True: calls.append(trainer.global_step) or flag)
        return trainer

    for world_size, expected in ((2, [5, 10, 15]), (1, list(range(1, 18)))):
        calls.clear()
        callback = PreemptionCallback(tmp_path, check_every_n_steps=5)
        trainer = make_trainer(world_size)
        callback.on_train_start(trainer, None)
        for step in range(1, 18):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, None, None, None, step)
            callback.on_train_batch_end(trainer, None, None, None, step)  # an accumulation micro-batch: no new step
        assert calls == expected and not callback.preempted
    with pytest.raises(ValueError, match="preemption_check_every_n_steps"):
        PreemptionCallback(tmp_path, check_every_n_steps=0)


# ---------------------------------------------------------------------------------------------- SIGKILL
KILL_AT_STEP = 6  # killed inside training_step of optimizer step 7 (after its forward pass)
KILLED_RUN = """
import os, signal, sys
from framework.objectives.clm import CausalLM
step = CausalLM.training_step
def killed_mid_step(self, batch, batch_idx):
    loss = step(self, batch, batch_idx)
    if self.trainer.global_step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss
CausalLM.training_step = killed_mid_step
from framework.commands.train import main
sys.argv = ["fw-train", *sys.argv[1:]]
main()
"""


def _csv_losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_sigkilled_run_resumes_with_the_losses_of_an_uninterrupted_run(compose, data_cache, tiny_prepared, tmp_path):
    overrides = ["trainer.max_steps=12", "callbacks.checkpoint_every_n_steps=4", "callbacks.keep_checkpoints=1",
                 "trainer.log_every_n_steps=1", "trainer.val_check_interval=100", "data.val_windows=8",
                 "torch_threads=1"]
    cfg = to_run_config(compose(overrides))
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    run(cfg, full_dir)

    cli = TINY + [f"data.cache_dir={data_cache}", *overrides, f"run_dir={killed_dir}", f"hydra.run.dir={killed_dir}",
                  "hydra.output_subdir=null"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN.format(kill_at=KILL_AT_STEP), *cli], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resume_from = find_resume_checkpoint(killed_dir / "checkpoints")
    assert safe_load(resume_from)["global_step"] == 4  # the last complete checkpoint before the kill

    metrics = run(cfg, killed_dir)  # resume=auto
    assert metrics["step"] == 12
    full, resumed = _csv_losses(full_dir), _csv_losses(killed_dir)
    assert [s for s, _ in resumed] == list(range(12))  # every step logged exactly once, no gaps
    for (step, loss), (_, reference) in zip(resumed, full):
        assert loss == pytest.approx(reference, rel=1e-6, abs=1e-6), step
