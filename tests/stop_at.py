"""A callback the resume tests share: stop training once ``global_step`` reaches a given step."""

from __future__ import annotations

import lightning as L


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True
