"""A causal-LM run that records the raw windows each rank trains on, for tests/test_world_size_resume.py.

    python world_size_worker.py <out_dir> [--resume CKPT] [--stop-at STEP] <hydra overrides...>

Each rank writes ``<out_dir>/rank<r>.json``: the world size and, per micro-batch, (global step, the rows of the
(B, seq_len + 1) token batch). Lightning's subprocess launcher re-runs this script for the other ranks, so it is a
plain script; the tests call ``fit`` directly for single-process runs.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from framework.config import compose  # noqa: E402
from framework.run import build_run  # noqa: E402
from stop_at import StopAt  # noqa: E402


class RecordWindows(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append([int(trainer.global_step), batch.tolist()])

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "world": trainer.world_size, "rows": self.rows,
            "position": trainer.datamodule.global_samples_consumed}))


def fit(out: Path, overrides: list[str], resume: str | None = None, stop_at: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(overrides)
    trainer, module, dm, _ = build_run(cfg, out / "run")
    trainer.callbacks += [RecordWindows(out)] + ([StopAt(stop_at)] if stop_at else [])
    trainer.fit(module, datamodule=dm, ckpt_path=resume)


def main() -> None:
    args, resume, stop_at = sys.argv[2:], None, None
    while args and args[0] in ("--resume", "--stop-at"):
        if args[0] == "--resume":
            resume = args[1]
        else:
            stop_at = int(args[1])
        args = args[2:]
    torch.set_num_threads(1)
    fit(Path(sys.argv[1]), args, resume, stop_at)


if __name__ == "__main__":
    main()
