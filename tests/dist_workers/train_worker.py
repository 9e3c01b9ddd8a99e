"""A framework training run (any strategy) that records what the strategy tests compare.

Launched by tests/test_fsdp.py and tests/test_consolidate.py as a subprocess; Lightning's subprocess launcher
re-runs this script for rank 1, so it is a plain script, not a test.

    python train_worker.py <out_dir> [--resume CKPT] <hydra overrides...>

Rank 0 writes ``<out_dir>/result.json``: per-step training loss averaged over all ranks (what a single
process would compute on the union of the ranks' micro-batches), the world size and how many parameter
values this rank holds (less than the model under FSDP); and ``<out_dir>/final_weights.pt``: the full
(gathered) float32 state_dict at the end.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from framework.config import compose  # noqa: E402
from framework.run import build_run  # noqa: E402


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.losses = out, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses[int(trainer.global_step) - 1] = float(loss)  # the step this loss was computed at

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in pl_module.parameters())
        if any(isinstance(p, DTensor) for p in pl_module.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save(weights, self.out / "final_weights.pt")
            (self.out / "result.json").write_text(json.dumps({
                "world_size": trainer.world_size, "local_numel": local,
                "losses": [self.losses[s] for s in sorted(self.losses)], "first_step": min(self.losses),
            }))


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    resume = None
    if args and args[0] == "--resume":
        resume, args = args[1], args[2:]
    cfg = compose(args)
    torch.set_num_threads(1)
    trainer, module, dm, _ = build_run(cfg, out / "run")
    trainer.callbacks.append(Record(out))
    trainer.fit(module, datamodule=dm, ckpt_path=resume)


if __name__ == "__main__":
    main()
