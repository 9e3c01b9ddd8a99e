"""Checksums and a completeness marker around a sharded strategy's checkpoint save (FSDP/DCP, DeepSpeed).

Sharded directories are written by their strategies on every rank, not by ``AtomicCheckpointIO``, so the
hook is a wrapper of ``trainer.strategy.save_checkpoint`` (installed in ``setup``), the one call both
Lightning's ``ModelCheckpoint`` and ``PreemptionCallback`` go through:

1. rank 0 creates the directory and ``.incomplete`` in it (a strategy that rewrites ``last.ckpt`` in place
   leaves the old ``.metadata``/``latest`` there: without the marker a half-rewritten directory would look
   complete); barrier;
2. the strategy saves (all ranks);
3. barrier; the files are hashed, rank r hashing files r, r + world_size, ... (a shared file system, as for
   resume itself); rank 0 writes ``checksums.sha256``, then removes the marker.

A failed save (ENOSPC or any OSError, which torch.distributed.checkpoint raises as a ``CheckpointException``)
removes the partial directory and raises ``CheckpointWriteError`` (one sentence, exit status 1).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch

from framework.checkpointing.checkpoints import CheckpointWriteError, state_nbytes
from framework.checkpointing.integrity import INCOMPLETE, file_sha256, fsync_path, manifest_files, write_manifest


def _gather(local: dict, world_size: int) -> dict:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, local)
        return {k: v for part in gathered for k, v in part.items()}
    return local


_ZIP_WRITE_FAILED = ("unexpected pos", "failed writing")  # torch.save's zip writer turns an OSError into these


def write_failure(err: BaseException) -> BaseException | None:
    """The OSError (or torch.save's RuntimeError for one) behind a failed sharded save, else None.
    torch.distributed.checkpoint gathers every rank's exception into a ``CheckpointException`` (a
    BaseException) whose ``failures`` map rank -> (exception, traceback)."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        if isinstance(current, RuntimeError) and any(s in str(current) for s in _ZIP_WRITE_FAILED):
            return current
        for failure in getattr(current, "failures", {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
        pending += [current.__cause__, current.__context__]
    return None


class ShardedChecksums(L.Callback):
    """Wraps a sharded strategy's ``save_checkpoint`` with the marker and the checksum manifest (module doc)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if getattr(strategy, "_checksummed", False) or not _writes_directories(strategy):
            return
        original = strategy.save_checkpoint

        def save_checkpoint(checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
            path = Path(strategy.broadcast(str(filepath)))
            if strategy.is_global_zero:
                if path.is_file():  # a single-file checkpoint of an earlier run under that name
                    strategy.remove_checkpoint(path)
                path.mkdir(parents=True, exist_ok=True)
                (path / INCOMPLETE).write_bytes(b"")
            strategy.barrier("checksums-start")
            need = _previous_size(path) or state_nbytes(checkpoint)  # before the save pops the state
            try:
                original(checkpoint, filepath, storage_options=storage_options)
            except BaseException as err:
                cause = write_failure(err)
                if cause is None:
                    raise
                if strategy.is_global_zero:
                    shutil.rmtree(path, ignore_errors=True)
                raise CheckpointWriteError.describe(path, need, cause) from err
            strategy.barrier("checksums-hash")
            files = strategy.broadcast(manifest_files(path) if strategy.is_global_zero else None)
            mine = files[strategy.global_rank::strategy.world_size]
            digests = _gather({name: file_sha256(path / name) for name in mine}, strategy.world_size)
            if strategy.is_global_zero:
                write_manifest(path, digests)
                (path / INCOMPLETE).unlink()
                fsync_path(path)
            strategy.barrier("checksums-done")

        strategy.save_checkpoint = save_checkpoint
        strategy._checksummed = True


def _previous_size(path: Path) -> int:
    """Bytes of the largest other sharded checkpoint beside ``path`` (0 when there is none)."""
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
             for d in path.parent.glob("*.ckpt") if d.is_dir() and d != path]
    return max(sizes, default=0)


def _writes_directories(strategy: Any) -> bool:
    """ModelParallelStrategy with distributed checkpoints, or DeepSpeed: the strategies that write directories."""
    if getattr(strategy, "_save_distributed_checkpoint", False):
        return True
    return type(strategy).__name__ == "DeepSpeedStrategy"

