"""The CSV metrics log and the signal handling, in one process: a row written ahead of a checkpoint is not
written twice, a resumed run drops the rows its checkpoint does not cover, new keys keep old rows, and our
SIGTERM handler, not Lightning's, decides what a signal does."""

from __future__ import annotations

import csv
import os
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from framework.callbacks.preemption import PreemptionCallback
from framework.checkpointing.checkpoints import AtomicCheckpointIO, safe_load
from framework.tracking.metrics_log import MetricsLogCallback, ResumableCSVLogger


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _logged(tmp_path, rows: list[tuple[int, dict]]) -> ResumableCSVLogger:
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step, metrics in rows:
        logger.log_metrics(metrics, step)
        logger.save()
    return logger


def test_a_row_written_ahead_is_not_written_again_and_later_values_are_kept(tmp_path):
    logger = _logged(tmp_path, [(0, {"train/loss": 3.0, "epoch": 0})])
    logger.write_row_now({"train/loss": 2.5, "epoch": 0}, step=1)  # before the checkpoint of step 1
    logger.write_row_now({"train/loss": 2.5, "epoch": 0}, step=1)  # last.ckpt of the same step
    path = tmp_path / "csv" / "metrics.csv"
    assert [r["train/loss"] for r in _rows(path)] == ["3.0", "2.5"]  # on disk already
    logger.log_metrics({"train/loss": 2.5, "epoch": 0}, step=1)  # Lightning's own copy: skipped
    logger.save()
    logger.write_row_now({"train/loss": float("nan"), "epoch": 0}, step=2)
    logger.log_metrics({"train/loss": float("nan"), "throughput/mfu": 0.5, "epoch": 0}, step=2)  # one value more
    logger.log_metrics({"val/loss": 2.4, "epoch": 0}, step=2)
    logger.save()
    rows = _rows(path)
    assert [(r["step"], r["train/loss"], r["throughput/mfu"], r["val/loss"]) for r in rows] == [
        ("0", "3.0", "", ""), ("1", "2.5", "", ""), ("2", "nan", "", ""), ("2", "", "0.5", ""), ("2", "", "", "2.4")]


def test_a_restarted_logger_drops_rows_after_the_checkpoint_and_keeps_the_header_across_new_keys(tmp_path):
    _logged(tmp_path, [(s, {"train/loss": 10.0 - s, "epoch": 0}) for s in range(6)] + [(3, {"val/loss": 7.5})])
    path = tmp_path / "csv" / "metrics.csv"
    resumed = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # a new process, same run
    resumed.drop_rows_from(4)  # resumed from the checkpoint at global_step 4: CSV steps 4, 5 are logged again
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in _rows(path)] == [
        ("0", "10.0", ""), ("1", "9.0", ""), ("2", "8.0", ""), ("3", "7.0", ""), ("3", "", "7.5")]
    resumed.log_metrics({"train/loss": 6.5, "epoch": 0}, 4)
    resumed.save()
    resumed.log_metrics({"train/loss": 6.0, "throughput/mfu": 0.25, "epoch": 0}, 5)  # a key the file lacks
    resumed.save()
    rows = _rows(path)
    assert list(rows[0]) == ["epoch", "step", "throughput/mfu", "train/loss", "val/loss"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "3", "4", "5"]
    assert rows[-1]["throughput/mfu"] == "0.25" and rows[-2]["train/loss"] == "6.5"
    assert not os.path.exists(str(path) + ".tmp")


def test_a_row_cut_short_by_a_kill_is_dropped_on_restart(tmp_path):
    _logged(tmp_path, [(s, {"train/loss": 10.0 - s, "epoch": 0}) for s in range(3)])
    path = tmp_path / "csv" / "metrics.csv"
    with open(path, "a") as f:
        f.write("0,3,6.")  # the start of step 3's row, then the process was killed
    ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="").drop_rows_from(4)
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2"]
    path.write_text(path.read_text() + "0,3\n")  # a line with fewer fields than the header
    ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="").drop_rows_from(4)
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------- in a Trainer
class _Signalled(L.LightningModule):
    """Logs its loss every step; sends itself ``sig`` inside the training step that ends at step ``at`` + 1."""

    def __init__(self, sig: signal.Signals, at: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sig, self.at = sig, at

    def training_step(self, batch, batch_idx):
        loss = (self.layer(torch.rand(4)) ** 2).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        if self.global_step == self.at:
            os.kill(os.getpid(), self.sig)  # the handler runs right here, mid-step
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(1000), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sigterm_is_ours_not_lightnings_checkpoint_row_and_exit_status_143(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    preemption = PreemptionCallback(tmp_path / "checkpoints")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    rows_at_save = []
    save = AtomicCheckpointIO.save_checkpoint

    def save_and_read_log(self, checkpoint, path, storage_options=None):
        rows_at_save.append([r["step"] for r in _rows(tmp_path / "csv" / "metrics.csv")])
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_and_read_log)
    trainer = L.Trainer(max_steps=20, callbacks=[MetricsLogCallback(), preemption], plugins=[AtomicCheckpointIO()],
                        logger=logger, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    handler_before = signal.getsignal(signal.SIGTERM)
    trainer.fit(_Signalled(signal.SIGTERM, at=3))  # Lightning's handler would raise SystemExit(0) here
    assert preemption.preempted and trainer.global_step == 4 and not trainer.received_sigterm
    assert safe_load(tmp_path / "checkpoints" / "preempted-step0000004.ckpt")["global_step"] == 4
    assert rows_at_save == [["0", "1", "2", "3"]]  # step 4's row (CSV step 3) was on disk before its checkpoint
    assert [r["step"] for r in _rows(tmp_path / "csv" / "metrics.csv")] == ["0", "1", "2", "3"]  # and only once
    assert preemption.stop_signal == signal.SIGTERM and preemption.exit_status(trainer, requeued=False) == 143
    assert preemption.requeue(trainer) is False  # a stop signal never requeues
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_ranks_agree_on_the_stopping_signal_and_only_rank_0_decides_a_requeue(tmp_path, monkeypatch):
    def trainer_of(rank: int, received: list[int]):
        strategy = SimpleNamespace(root_device=torch.device("cpu"), all_gather=lambda t: torch.tensor(received))
        return SimpleNamespace(world_size=len(received), strategy=strategy, is_global_zero=rank == 0)

    callback = PreemptionCallback(tmp_path)
    usr1, term = int(signal.SIGUSR1), int(signal.SIGTERM)
    assert callback.agree_on_signal(trainer_of(0, [0, 0])) is None
    assert callback.agree_on_signal(trainer_of(0, [0, usr1])) == signal.SIGUSR1  # only rank 1 was signalled
    assert callback.agree_on_signal(trainer_of(0, [usr1, term])) == signal.SIGTERM  # a stop wins over a requeue
    callback.stop_signal = signal.SIGUSR1
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert callback.exit_status(trainer_of(1, [0, usr1]), requeued=False) == 138  # no SLURM: nothing requeues it
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert callback.exit_status(trainer_of(0, [0, usr1]), requeued=True) == 0
    assert callback.exit_status(trainer_of(0, [0, usr1]), requeued=False) == 138  # scontrol requeue failed
    assert callback.exit_status(trainer_of(1, [0, usr1]), requeued=False) == 0  # srun must not kill rank 0 first
    callback.stop_signal = signal.SIGTERM
    assert callback.exit_status(trainer_of(1, [0, term]), requeued=False) == 143


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    callback = PreemptionCallback(tmp_path)
    callback._handler(signal.SIGINT, None)
    assert callback.signal_received and callback.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._handler(signal.SIGINT, None)
