"""Checkpoint files that survive preemption, bit rot and a full disk: atomic checksummed writes, safe loads,
exact-resume state.

- ``AtomicCheckpointIO`` (a Lightning CheckpointIO plugin) writes ``<name>.tmp``, fsyncs it, records its
  SHA-256 in the sidecar ``<name>.sha256`` (``framework.checkpointing.integrity`` has the scheme) and renames it
  over ``<name>``, so a reader sees either the previous complete file or the new complete file, never a
  partial one. ModelCheckpoint saves the new file before it removes an older one (Lightning 2.6
  ``_save_last_checkpoint`` / ``_update_best_and_save``), so a complete checkpoint exists at every instant.
  Loading uses ``torch.load(weights_only=True)``: no pickled code runs, only tensors and plain containers.
- A write that fails (ENOSPC, any OSError) removes its temporary file, leaves every earlier checkpoint as it
  was and raises ``CheckpointWriteError``: one sentence with the path, the space the checkpoint needs and
  the space free; ``fw-train`` prints it and exits with status 1 after Lightning has finalized the loggers.
- Resume discovery and retention after a resume: ``framework.checkpointing.resume``.
- ``ResumeStateCallback`` stores what Lightning does not: every rank's RNG states (torch, CUDA, numpy,
  python) and the wandb run id, so a resumed run draws the same random numbers and continues the same
  wandb run; after a resume it removes the step checkpoints ModelCheckpoint has forgotten.

Sharded checkpoints (FSDP/DeepSpeed directories) are written by their strategies, not by this plugin;
``framework.checkpointing.sharded_checksums`` adds their checksums and failure handling.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from framework.checkpointing.integrity import fsync_path, safe_load, sidecar, write_sidecar
from framework.checkpointing.resume import (  # noqa: F401  (the discovery API, re-exported)
    LIGHTNING_META, STEP_PATTERN, TMP_SUFFIX, checkpoint_step, find_resume_checkpoint, is_complete,
    prune_step_checkpoints, resolve_resume, scan_checkpoints)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); the message is one sentence."""

    @classmethod
    def describe(cls, path: Path, need: int, err: BaseException) -> "CheckpointWriteError":
        """``need``: bytes the checkpoint takes (estimated from its state or the previous checkpoint)."""
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = -1
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
        return cls(f"could not write checkpoint {path} ({reason}): it needs about {_size(need)} and "
                   f"{_size(free) if free >= 0 else 'an unknown amount'} is free there; the earlier checkpoints are "
                   f"intact, so free some space (or lower callbacks.keep_checkpoints) and run the same command "
                   f"to resume.")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a checkpoint dict (what torch.save writes, give or take the pickle)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()  # a DTensor counts its global shape: the whole sharded checkpoint
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _fsync_dir(directory: Path) -> None:
    """Best effort: a file system that cannot sync a directory still keeps the checkpoint."""
    try:
        fsync_path(directory)
    except OSError:
        pass


class _HashingWriter:
    """The file object torch.save writes through: hashes the bytes as they go (torch's zip writer only appends,
    so this is the file's SHA-256 without reading it back) and remembers the OSError of a failed write, which
    the zip writer reports only as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``."""

    def __init__(self, file: Any) -> None:
        self.file, self.error, self.sha256 = file, None, hashlib.sha256()

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def _save_and_hash(obj: Any, file: Any) -> str:
    """torch.save ``obj`` into ``file``; the SHA-256 hex digest of the bytes written."""
    writer = _HashingWriter(file)
    try:
        torch.save(obj, writer)
    except RuntimeError as err:
        if writer.error is None:
            raise
        raise writer.error from err
    return writer.sha256.hexdigest()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, checksum sidecar, then ``os.replace`` onto ``path`` (atomic on
    POSIX). An OSError (a full disk) removes the temporary file and raises ``CheckpointWriteError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            digest = _save_and_hash(obj, f)
            f.flush()
            os.fsync(f.fileno())
        write_sidecar(path, digest, keep_previous=True)  # valid for the old and the new file during the rename
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CheckpointWriteError.describe(path, state_nbytes(obj), err) from err
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    try:
        write_sidecar(path, digest, keep_previous=False)
    except OSError:
        pass  # the sidecar that also lists the replaced file's digest still verifies the new file


def read_training_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(hyper_parameters, the model's state dict without the ``model.`` prefix, the whole checkpoint) of a
    single-file checkpoint written by ``framework.run``; what export, generation and continued pretraining
    read. A sharded directory, a missing file or another program's checkpoint is refused in one sentence."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a sharded checkpoint directory (FSDP2 / DeepSpeed); consolidate it into one file "
                         f"first: fw-consolidate {path} full.ckpt")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; give a .ckpt file (<run_dir>/checkpoints/last.ckpt).")
    ckpt = safe_load(path)
    hp = ckpt.get("hyper_parameters")
    if not hp or "model_config" not in hp:
        raise ValueError(f"{path} is not a checkpoint of this framework's training (no model_config hyperparameters).")
    state = {}
    for name, tensor in ckpt["state_dict"].items():
        name = name.replace("_orig_mod.", "")  # torch.compile's wrapper
        if name.startswith("model."):
            state[name[len("model."):]] = tensor
    return dict(hp), state, ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints (auto/DDP strategies): atomic checksummed save, weights-only load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options.")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if weights_only is False:
            raise ValueError("AtomicCheckpointIO only loads checkpoints with weights_only=True (no pickled code).")
        return torch.load(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
            sidecar(path).unlink(missing_ok=True)


def checkpoint_plugins(strategy_name: str) -> list:
    """The CheckpointIO plugin for strategies that write one file per checkpoint; sharded ones write their own."""
    return [AtomicCheckpointIO()] if strategy_name in ("auto", "ddp") else []


def checkpoint_wandb_id(path: str | Path | None) -> str | None:
    """The wandb run id stored in a checkpoint by ``ResumeStateCallback`` (None when absent)."""
    if not path or Path(path).is_dir():
        return None
    try:
        run_id = safe_load(path, mmap=True).get(ResumeStateCallback.WANDB_KEY)
    except Exception:
        return None
    return str(run_id) if run_id else None


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeStateCallback(L.Callback):
    """Saves every rank's RNG states and the wandb run id in each checkpoint and restores them on resume.

    The RNG is restored at the first training batch after loading, so the draws Lightning makes while it
    rebuilds the dataloader do not shift the stream. Validation during fit is made RNG-neutral (the state
    at the end of the last training batch is put back when validation ends), so a checkpoint taken before
    a validation resumes to the same stream as the uninterrupted run. Exact for randomness drawn inside
    training steps; a collator in the main process collates the first resumed batches before any hook, so
    collation randomness is exact only when the collator seeds itself from the sample position.
    """

    RNG_KEY = "rng_states"  # list indexed by global rank
    WANDB_KEY = "wandb_run_id"

    def __init__(self) -> None:
        self._pending: dict | None = None  # loaded state, applied at the next training batch
        self._after_train_batch: tuple | None = None  # raw states at the end of the last training batch

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        local = rng_state()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)  # every rank runs dump_checkpoint
        else:
            gathered = [local]
        checkpoint[self.RNG_KEY] = gathered
        run_id = wandb_logger_id(trainer)
        if run_id:
            checkpoint[self.WANDB_KEY] = run_id

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get(self.RNG_KEY)
        if states and len(states) == trainer.world_size:
            self._pending = states[trainer.global_rank]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume: remove the step checkpoints beyond ``save_top_k`` that ModelCheckpoint has forgotten."""
        checkpointing = trainer.checkpoint_callback
        if not trainer.ckpt_path or not trainer.is_global_zero or checkpointing is None or not checkpointing.dirpath:
            return
        removed = prune_step_checkpoints(Path(checkpointing.dirpath), checkpointing.save_top_k, trainer.global_step,
                                         Path(trainer.ckpt_path))
        if removed:
            print(f"removed {len(removed)} old step checkpoint(s) beyond callbacks.keep_checkpoints="
                  f"{checkpointing.save_top_k}: {', '.join(p.name for p in removed)}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._after_train_batch = _raw_rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._after_train_batch is not None:
            _set_raw_rng_state(self._after_train_batch)


def _raw_rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def _set_raw_rng_state(state: tuple) -> None:
    cpu, np_state, py_state, cuda = state
    torch.set_rng_state(cpu)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def wandb_logger_id(trainer: L.Trainer) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return str(logger.version) if logger.version else None
    return None
