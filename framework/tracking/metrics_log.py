"""The CSV metrics log ``<run_dir>/csv/metrics.csv``: every logged optimizer step has exactly one row, across
kills, signals, failed checkpoint writes and resumes.

Lightning (2.6, ``_TrainingEpochLoop.advance``) builds a training step's row after every callback's
``on_train_batch_end``, but ``ModelCheckpoint`` (and the preemption callback) save the step's checkpoint
inside ``on_train_batch_end``: a process killed between the two resumes after that step and never logs its
row again. So:

- ``MetricsLogCallback.on_save_checkpoint`` (called while the checkpoint is assembled, before any byte of it
  is written) writes that row now, flushed and fsynced; the logger then skips Lightning's identical copy.
- ``MetricsLogCallback.on_train_start`` removes the rows at or after the step the run (re)starts from: a
  killed run logged them after its last checkpoint, and they are logged again.
- a new metric key rewrites the file with the wider header through a temporary file and a rename (Lightning
  truncates the file and writes it again, so a kill in between would lose every row).
- a write that fails (a full disk, a quota: any OSError) cuts the file back to its last complete row, removes
  its temporary file and raises ``MetricsWriteError``, which ``fw-train`` prints as one sentence (exit status
  1) like a failed checkpoint write; the rows on disk and the checkpoints stay intact, so a resume is exact.

CSV steps count optimizer steps from 0: the row of the step that a checkpoint at ``global_step`` s ends is
step s - 1, and a run resumed from it logs steps s, s + 1, ...
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from framework.checkpointing.checkpoints import CheckpointWriteError, _size
from framework.checkpointing.integrity import fsync_path


class MetricsWriteError(CheckpointWriteError):
    """``metrics.csv`` could not be written (a full disk, a quota); one sentence. A subclass of
    ``CheckpointWriteError`` so that every entry point that stops cleanly on a failed checkpoint write stops the
    same way on a failed log write."""

    @classmethod
    def describe(cls, path: str, err: BaseException) -> "MetricsWriteError":  # type: ignore[override]
        try:
            free = _size(shutil.disk_usage(os.path.dirname(path)).free)
        except OSError:
            free = "an unknown amount"
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
        return cls(f"could not write the metrics log {path} ({reason}): {free} is free there; its earlier rows and "
                   f"the checkpoints are intact, so free some space and run the same command to resume.")


class _AppendingCSVWriter(ExperimentWriter):
    """Keeps ``metrics.csv`` when a run restarts (Lightning's writer deletes it) and rewrites it atomically."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass

    def save(self, durable: bool = False) -> None:
        """Append the buffered rows; ``durable``: also fsync, so they survive a power loss, not only a kill.
        On a failed write the file is cut back to what it held and the rows stay buffered."""
        path, keys = self.metrics_file_path, list(self.metrics_keys)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        try:
            super().save()
            if durable and os.path.isfile(path):
                fsync_path(path)
        except (OSError, MetricsWriteError) as err:
            self.metrics_keys = keys  # the header on disk (a wider one may not have been written)
            self._cut_back(size)
            if isinstance(err, MetricsWriteError):
                raise
            raise MetricsWriteError.describe(path, err) from err

    def _cut_back(self, size: int | None) -> None:
        """Drop what a failed append left: truncating to the old size (None: no file) needs no free space."""
        try:
            if size is None:
                os.remove(self.metrics_file_path)
            else:
                os.truncate(self.metrics_file_path, size)
        except OSError:
            pass

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._replace(fieldnames, rows)

    def drop_rows_from(self, step: int) -> None:
        """Remove the rows (buffered or written) whose step is ``step`` or later, and a last line that a kill
        (or a full disk) cut short: it has no newline at its end or fewer fields than the header."""
        self.metrics = [m for m in self.metrics if int(m["step"]) < step]
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            text = f.read()
        complete = text[:text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(complete)))
        kept = [r for r in rows if None not in r.values() and r.get("step") and int(float(r["step"])) < step]
        if len(kept) < len(rows) or len(complete) < len(text):
            self._replace(self.metrics_keys, kept)

    def _replace(self, fieldnames: list[str], rows: list[dict]) -> None:
        tmp = self.metrics_file_path + ".tmp"
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.metrics_file_path)
        except OSError as err:  # the old file is untouched
            if os.path.exists(tmp):
                os.remove(tmp)
            raise MetricsWriteError.describe(self.metrics_file_path, err) from err


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that appends across restarts of a run and can write a step's row ahead of Lightning."""

    _early_row: tuple[int, dict] | None = None  # (step, row) written by ``write_row_now``, not yet seen again

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        early, self._early_row = self._early_row, None
        if early is not None and early[0] == step:  # Lightning's copy of the row written ahead of it:
            metrics = {k: v for k, v in metrics.items() if k not in early[1] or not _same(early[1][k], v)}
            if not set(metrics) - {"epoch"}:  # nothing new (values logged after the checkpoint would remain)
                return
        super().log_metrics(metrics, step)

    @rank_zero_only
    def write_row_now(self, metrics: dict, step: int) -> None:
        """Write (and fsync) the row of ``step`` now; Lightning's later identical ``log_metrics`` is skipped."""
        if self._early_row is not None and self._early_row[0] == step:
            return  # a second checkpoint of the same step (``last.ckpt`` after ``step*.ckpt``)
        super().log_metrics(metrics, step)
        self.save_durably()
        self._early_row = (step, dict(metrics))

    @rank_zero_only
    def save(self) -> None:
        """Lightning's save: the buffered rows (``_AppendingCSVWriter.save``), then ``hparams.yaml`` again."""
        try:
            super().save()
        except OSError as err:  # hparams.yaml
            raise MetricsWriteError.describe(getattr(err, "filename", None) or self.log_dir, err) from err

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Lightning finalizes loggers with "failed" while an exception (perhaps this log's own full disk) is on
        its way out: a second failed write then must not replace it, nor stop Lightning's teardown. The rows it
        could not write are those after the last checkpoint, which a resume logs again."""
        try:
            super().finalize(status)
        except MetricsWriteError:
            if status != "failed":
                raise

    @rank_zero_only
    def save_durably(self) -> None:
        self.experiment.save(durable=True)

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        self.experiment.drop_rows_from(step)


def pending_train_row(trainer: L.Trainer) -> tuple[int, dict] | None:
    """(step, row) that Lightning will log for the training step now ending, when called between that step's
    ``training_step`` and Lightning's logging of it (inside ``on_train_batch_end``); else None.
    Mirrors ``_LoggerConnector.update_train_step_metrics`` and ``log_metrics`` (Lightning 2.6)."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.current
    if not trainer.training or progress.processed <= progress.completed:  # not inside a batch's end hooks
        return None
    connector = trainer._logger_connector
    if loop._should_accumulate() or not connector.should_update_logs:
        return None  # Lightning writes no row after this micro-batch
    row = convert_tensors_to_scalars(connector.metrics["log"])
    if not row:
        return None
    step = row.pop("step", None)
    if step is None:
        row.setdefault("epoch", trainer.current_epoch)
        step = loop._batches_that_stepped
    return int(step), row


class MetricsLogCallback(L.Callback):
    """Keeps the CSV log exact: the row of a checkpointed step is on disk before the checkpoint, and a
    resumed run first removes the rows its checkpoint does not cover."""

    @staticmethod
    def _csv_loggers(trainer: L.Trainer) -> list[ResumableCSVLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in self._csv_loggers(trainer):
            logger.drop_rows_from(trainer.global_step)  # the first step this run logs

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loggers = self._csv_loggers(trainer)
        row = pending_train_row(trainer) if loggers and trainer.is_global_zero else None
        for logger in loggers:
            if row is not None:
                logger.write_row_now(row[1], row[0])
            else:
                logger.save_durably()
