"""Per-source training metrics: ``train/tokens_seen/<source>`` while training and the per-source entries of
final_metrics.json. A single source is a mixture of weight 1, so it gets them too (under its ``data.source`` name)."""

from __future__ import annotations

import lightning as L

from framework.callbacks.throughput import logs_this_step


class SourceTokensLogger(L.Callback):
    """Logs ``train/tokens_seen/<source>`` (all ranks' input tokens drawn from each source) on the steps the
    loggers write: windows per source (host counters of the schedule) x input tokens per window."""

    def __init__(self) -> None:
        self.tokens_per_window: int | None = None
        self._step: int | None = None  # optimizer steps completed when the running micro-batch started

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        dm = trainer.datamodule
        if self.tokens_per_window is None:
            self.tokens_per_window = pl_module.batch_tokens(batch) // dm.micro_batch_size
        if not logs_this_step(trainer, self._step):  # the step's metrics are not written
            return
        for name, windows in dm.source_windows.items():
            pl_module.log(f"train/tokens_seen/{name}", float(windows * self.tokens_per_window), on_step=True,
                          on_epoch=False)


def source_metrics(results: list[dict], dm, trainer: L.Trainer) -> dict:
    """Per-source entries of final_metrics.json from ``trainer.validate``'s results (one dict per val
    dataloader; Lightning suffixes a dataloader's metrics with ``/dataloader_idx_<i>`` when there are several)
    and the schedule of ``dm`` (a ``PretrainDataModule``)."""
    out: dict = {}
    for i, name in enumerate(dm.names):
        row = results[i] if i < len(results) else {}
        out[f"val_loss_nats/{name}"] = float(row.get(f"val/{name}/loss/dataloader_idx_{i}",
                                                     row.get(f"val/{name}/loss", float("nan"))))
    logger = next((c for c in trainer.callbacks if isinstance(c, SourceTokensLogger)), None)
    if logger is not None and logger.tokens_per_window:
        out.update({f"tokens_seen/{n}": w * logger.tokens_per_window for n, w in dm.source_windows.items()})
    out.update({f"epochs/{n}": round(e, 4) for n, e in dm.source_epochs.items()})
    return out
