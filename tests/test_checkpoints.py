"""Atomic checkpoint files, weights-only loading and resume discovery (framework/checkpointing/checkpoints.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from framework.checkpointing.checkpoints import (
    AtomicCheckpointIO,
    atomic_torch_save,
    checkpoint_step,
    find_resume_checkpoint,
    is_complete,
    resolve_resume,
    safe_load,
)


def _ckpt(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def _truncate(path: Path, fraction: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full")  # stands in for a write that dies half way


def test_failed_save_keeps_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save(_ckpt(4), path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"global_step": 8, "big": torch.zeros(1000), "bad": _FailsToPickle()}, path)
    assert safe_load(path)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_truncated_checkpoints_are_skipped_for_the_previous_complete_one(tmp_path):
    io = AtomicCheckpointIO()
    for step in (4, 8):
        io.save_checkpoint(_ckpt(step), tmp_path / f"step{step:07d}.ckpt")
    io.save_checkpoint(_ckpt(8), tmp_path / "last.ckpt")
    _truncate(tmp_path / "step0000008.ckpt")
    _truncate(tmp_path / "last.ckpt", 0.9)
    atomic_torch_save(_ckpt(12), tmp_path / "step0000012.ckpt")
    os.replace(tmp_path / "step0000012.ckpt", tmp_path / "step0000012.ckpt.tmp")  # an interrupted write

    assert is_complete(tmp_path / "step0000004.ckpt")
    assert not is_complete(tmp_path / "step0000008.ckpt")
    assert not is_complete(tmp_path / "last.ckpt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step0000004.ckpt"
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "step0000004.ckpt")
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        resolve_resume(str(tmp_path / "step0000008.ckpt"), tmp_path)
    # the chosen file really is whole: it loads and holds step 4's weights
    assert torch.equal(io.load_checkpoint(find_resume_checkpoint(tmp_path))["state_dict"]["w"], torch.full((64, 64), 4.0))


def test_resume_picks_the_highest_step_not_the_newest_file(tmp_path):
    atomic_torch_save(_ckpt(10), tmp_path / "last.ckpt")
    atomic_torch_save(_ckpt(8), tmp_path / "step0000008.ckpt")  # written later, but an earlier step
    assert checkpoint_step(tmp_path / "last.ckpt") == 10
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    atomic_torch_save(_ckpt(6), tmp_path / "last.ckpt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step0000008.ckpt"
    assert find_resume_checkpoint(tmp_path / "missing") is None


def _dcp_save(directory: Path) -> None:
    """A real torch.distributed.checkpoint directory (one process): tensors and an optimizer's non-tensor items."""
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": optimizer.state_dict()}, checkpoint_id=directory,
             no_dist=True)


def test_sharded_directories_count_once_complete_with_their_step_read_inside(tmp_path):
    atomic_torch_save(_ckpt(10), tmp_path / "step0000010.ckpt")
    dcp = tmp_path / "last.ckpt"  # FSDP via torch.distributed.checkpoint: shards, .metadata, then Lightning's meta.pt
    _dcp_save(dcp)
    assert not is_complete(dcp) and find_resume_checkpoint(tmp_path) == tmp_path / "step0000010.ckpt"
    torch.save({"global_step": 12, "loops": {}}, dcp / "meta.pt")
    assert is_complete(dcp) and checkpoint_step(dcp) == 12
    assert find_resume_checkpoint(tmp_path) == dcp

    deepspeed = tmp_path / "last-zero.ckpt"  # DeepSpeed: <tag>/*_states.pt, then the "latest" tag file
    (deepspeed / "checkpoint").mkdir(parents=True)
    torch.save({"global_step": 14, "module": None}, deepspeed / "checkpoint" / "mp_rank_00_model_states.pt")
    assert find_resume_checkpoint(tmp_path) == dcp  # no "latest" yet: still being written
    (deepspeed / "latest").write_text("checkpoint")
    assert checkpoint_step(deepspeed) == 14 and find_resume_checkpoint(tmp_path) == deepspeed


_EXECUTED = []


def _record_execution(tag):
    _EXECUTED.append(tag)
    return tag


class _Payload:
    def __reduce__(self):  # unpickling this object would call a function of the attacker's choosing
        return (_record_execution, ("ran",))


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"global_step": 1, "payload": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert _EXECUTED == []
    assert find_resume_checkpoint(tmp_path) is None  # its step cannot be read safely, so it is not a candidate


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = torch.randn(8, 4)
        return ((self.layer(x) - x.sum(1, keepdim=True)) ** 2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(1000), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class _RecordingIO(AtomicCheckpointIO):
    """Checks, at every removal, that a newer complete checkpoint is already on disk."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        self.events.append(("save", Path(path).name))

    def remove_checkpoint(self, path):
        removed = checkpoint_step(Path(path))
        others = [p for p in Path(path).parent.glob("*.ckpt") if p != Path(path) and is_complete(p)]
        assert any(checkpoint_step(p) > removed for p in others), f"{path} removed before a newer one was complete"
        self.events.append(("remove", Path(path).name))
        super().remove_checkpoint(path)


def test_lightning_checkpoints_are_weights_only_and_removed_only_after_a_newer_one(tmp_path):
    io = _RecordingIO()
    checkpointing = ModelCheckpoint(dirpath=tmp_path, filename="step{step:07d}", auto_insert_metric_name=False,
                                    every_n_train_steps=2, save_last=True, save_top_k=1, monitor="step", mode="max")
    trainer = L.Trainer(max_steps=6, plugins=[io], callbacks=[checkpointing], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Regression())
    assert ("remove", "step0000002.ckpt") in io.events and ("remove", "step0000004.ckpt") in io.events
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256", "step0000006.ckpt",
                                                          "step0000006.ckpt.sha256"]
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)  # a Lightning checkpoint needs no unpickling
    assert loaded["global_step"] == 6 and "optimizer_states" in loaded and "loops" in loaded
