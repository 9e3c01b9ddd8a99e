"""Checkpoint files that survive preemption: atomic writes, safe loads, resume discovery, exact-resume state.

- ``AtomicCheckpointIO`` (a Lightning CheckpointIO plugin) writes ``<name>.tmp``, fsyncs it and renames it
  over ``<name>``, so a reader sees either the previous complete file or the new complete file, never a
  partial one. ModelCheckpoint saves the new file before it removes an older one (Lightning 2.6
  ``_save_last_checkpoint`` / ``_update_best_and_save``), so a complete checkpoint exists at every instant.
  Loading uses ``torch.load(weights_only=True)``: no pickled code runs, only tensors and plain containers.
- ``find_resume_checkpoint`` picks the complete checkpoint with the highest global step (the step is in the
  file name ``step{step:07d}.ckpt``; ``last.ckpt`` is read lazily with mmap), skipping truncated files and
  leftover ``.tmp`` files.
- ``ResumeStateCallback`` stores what Lightning does not: every rank's RNG states (torch, CUDA, numpy,
  python) and the wandb run id, so a resumed run draws the same random numbers and continues the same
  wandb run.

Sharded checkpoints (FSDP/DeepSpeed directories) are written by their strategies, not by this plugin;
discovery accepts such a directory once the file its writer writes last exists, and reads its step from
the small trainer-state file inside.
"""

from __future__ import annotations

import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

STEP_PATTERN = re.compile(r"step(\d+)")
TMP_SUFFIX = ".tmp"
LIGHTNING_META = "meta.pt"  # what Lightning's ModelParallelStrategy writes last in a torch.distributed.checkpoint dir


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, then ``os.replace`` onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint without unpickling arbitrary objects (tensors, numbers, strings, containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def read_training_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(hyper_parameters, the model's state dict without the ``model.`` prefix, the whole checkpoint) of a
    single-file checkpoint written by ``framework.train``; what export, generation and continued pretraining
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
    """Single-file checkpoints (auto/DDP strategies): atomic save, weights-only load."""

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
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def checkpoint_plugins(strategy_name: str) -> list:
    """The CheckpointIO plugin for strategies that write one file per checkpoint; sharded ones write their own."""
    return [AtomicCheckpointIO()] if strategy_name in ("auto", "ddp") else []


# ---------------------------------------------------------------------------------------------- discovery
def is_complete(path: Path) -> bool:
    """A checkpoint file is complete when its zip central directory (written last by torch.save) is intact; a
    sharded directory when the file its writer writes last exists (FSDP/DCP: ``.metadata`` and Lightning's
    ``meta.pt``; DeepSpeed: the ``latest`` tag file)."""
    path = Path(path)
    if path.name.endswith(TMP_SUFFIX):
        return False
    if path.is_dir():
        return ((path / ".metadata").is_file() and (path / LIGHTNING_META).is_file()) or (path / "latest").is_file()
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def _sharded_step(directory: Path) -> int:
    """The global step of a sharded checkpoint directory, from the small file that holds the trainer state."""
    if (directory / LIGHTNING_META).is_file():
        return int(safe_load(directory / LIGHTNING_META).get("global_step", -1))
    tag = (directory / "latest").read_text().strip()  # DeepSpeed: <tag>/*model_states.pt hold the client state
    states = sorted((directory / tag).glob("*model_states.pt"))
    return int(safe_load(states[0], mmap=True).get("global_step", -1)) if states else -1


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at: from its name when it carries one, else read lazily
    (-1 when it cannot be read without unpickling arbitrary objects)."""
    path = Path(path)
    match = STEP_PATTERN.search(path.name)
    if match:
        return int(match.group(1))
    try:
        if path.is_dir():
            return _sharded_step(path)
        return int(safe_load(path, mmap=True).get("global_step", -1))
    except Exception:
        return -1


def find_resume_checkpoint(directory: Path) -> Path | None:
    """The complete ``*.ckpt`` in ``directory`` with the highest global step (newest file on a tie), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    ranked = []
    for path in directory.glob("*.ckpt"):
        if not is_complete(path):
            continue
        step = checkpoint_step(path)
        if step >= 0:
            ranked.append((step, path.stat().st_mtime, path))
    if not ranked:
        return None
    return max(ranked, key=lambda r: (r[0], r[1]))[2]


def resolve_resume(resume: str, checkpoint_dir: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = find_resume_checkpoint(checkpoint_dir)
        return str(found) if found else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint; use resume=auto, resume=never or a .ckpt path.")
    if not is_complete(path):
        raise ValueError(f"resume={resume!r} is an incomplete or corrupt checkpoint; pick an earlier one.")
    return str(path)


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
