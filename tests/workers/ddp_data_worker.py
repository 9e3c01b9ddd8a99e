"""Launched by tests/test_train.py: a 2-process DDP (gloo, CPU) run that records which windows each rank trains on.

Lightning's subprocess launcher re-runs this script for rank 1, so it is a plain script, not a test.
Usage: python ddp_data_worker.py <run_dir> <data_cache>
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from framework.config import compose  # noqa: E402
from framework.run import build_run  # noqa: E402


class RecordBatches(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append([int(trainer.global_step), [int(x) for x in batch[:, :8].flatten()]])

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rank": trainer.global_rank, "world": trainer.world_size, "rows": self.rows,
            "weights_checksum": float(sum(p.double().sum() for p in pl_module.parameters())),
        }))


def main() -> None:
    run_dir, cache = Path(sys.argv[1]), sys.argv[2]
    cfg = compose([
        "model=tiny", "data.max_documents=800", "data.vocab_size=512", "data.seq_len=64",
        "data.micro_batch_size=4", "data.num_proc=1", "data.val_windows=8", f"data.cache_dir={cache}",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp", "logger.csv=false",
    ])
    torch.set_num_threads(1)
    trainer, module, dm, _ = build_run(cfg, run_dir)
    trainer.callbacks.append(RecordBatches(run_dir))
    trainer.fit(module, datamodule=dm)


if __name__ == "__main__":
    main()
