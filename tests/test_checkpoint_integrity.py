"""Checksums, damaged and crafted checkpoints, refusal when none is usable, retention after a resume
(framework/checkpointing/integrity.py, resume.py, checkpoints.py)."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from framework.checkpointing.checkpoints import AtomicCheckpointIO, ResumeStateCallback, atomic_torch_save
from framework.checkpointing.integrity import (INCOMPLETE, file_sha256, manifest_files, read_checksums, sidecar,
                                             write_manifest, write_sidecar)
from framework.checkpointing.resume import (find_resume_checkpoint, is_complete, prune_step_checkpoints,
                                          resolve_resume, scan_checkpoints)


def _ckpt(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def _member_data_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(byte offset, size) of the stored bytes of the zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header: name and extra-field lengths at bytes 26..29
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip(path: Path, offset: int, count: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def flip_tensor_bytes(path: Path) -> None:
    """Flip bytes in the middle of the first tensor's data; the zip and the pickle stay well-formed."""
    offset, size = _member_data_offset(path, "/data/0")
    _flip(path, offset + size // 2)


def test_flipped_tensor_bytes_are_detected_and_the_previous_checkpoint_is_used(tmp_path, capsys):
    for step in (4, 8):
        atomic_torch_save(_ckpt(step), tmp_path / f"step{step:07d}.ckpt")
    flip_tensor_bytes(tmp_path / "step0000008.ckpt")
    damaged = torch.load(tmp_path / "step0000008.ckpt", weights_only=True)  # loads fine: only the checksum knows
    assert is_complete(tmp_path / "step0000008.ckpt")
    assert not torch.equal(damaged["state_dict"]["w"], _ckpt(8)["state_dict"]["w"])

    assert resolve_resume("auto", tmp_path) == str(tmp_path / "step0000004.ckpt")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"skipping checkpoint {tmp_path / 'step0000008.ckpt'}: its contents do not match its checksum "
                   "(corrupted on disk)."]
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        resolve_resume(str(tmp_path / "step0000008.ckpt"), tmp_path)


def test_a_kill_at_any_point_of_an_overwrite_leaves_a_verifiable_checkpoint(tmp_path):
    """The sidecar lists the old and the new digest while the rename is pending (integrity.py's scheme)."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save(_ckpt(4), path)
    old_digest = file_sha256(path)
    tmp = tmp_path / "last.ckpt.tmp"
    torch.save(_ckpt(8), tmp)
    write_sidecar(path, file_sha256(tmp), keep_previous=True)  # killed here: the old file must still verify
    assert read_checksums(sidecar(path))["last.ckpt"] == {old_digest, file_sha256(tmp)}
    assert scan_checkpoints(tmp_path)[0] == path
    os.replace(tmp, path)  # killed here: the new file verifies
    assert scan_checkpoints(tmp_path)[0] == path and torch.load(path, weights_only=True)["global_step"] == 8
    atomic_torch_save(_ckpt(12), path)
    assert read_checksums(sidecar(path))["last.ckpt"] == {file_sha256(path)}


def _damage_pickle(path: Path) -> None:
    offset, size = _member_data_offset(path, "data.pkl")
    with open(path, "r+b") as f:  # invalid opcodes in the middle of the pickle; the zip directory is intact
        f.seek(offset + size // 2)
        f.write(b"\xff" * 6)


def test_damaged_pickle_of_an_unchecksummed_checkpoint_falls_back_with_one_sentence(tmp_path, capsys):
    for step in (4, 8):
        torch.save(_ckpt(step), tmp_path / f"step{step:07d}.ckpt")  # an older version: no sidecar
    _damage_pickle(tmp_path / "step0000008.ckpt")
    assert is_complete(tmp_path / "step0000008.ckpt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step0000004.ckpt"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"skipping checkpoint {tmp_path / 'step0000008.ckpt'}: its pickle data is damaged.",
                   f"warning: checkpoint {tmp_path / 'step0000004.ckpt'} has no checksum (written by an older "
                   "version); using it unverified."]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this would call open(marker, "w"): a file appears if code runs
        return (open, (self.marker, "w"))


def test_crafted_pickle_is_skipped_without_running_its_code(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    atomic_torch_save(_ckpt(4), tmp_path / "step0000004.ckpt")
    for name in ("step0000008.ckpt", "last.ckpt"):
        crafted = tmp_path / name
        torch.save({"global_step": 8, "payload": _Payload(marker)}, crafted)
        write_sidecar(crafted, file_sha256(crafted), keep_previous=False)  # whoever crafts it can checksum it
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "step0000004.ckpt")
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "weights_only=False" not in err and "Traceback" not in err
    assert err == (f"skipping checkpoint {tmp_path / 'step0000008.ckpt'}: it holds pickled code that a weights-only "
                   "load refuses (none of it was run).\n")
    (tmp_path / "step0000004.ckpt").unlink()  # last.ckpt's step cannot be read safely: it ranks last, and fails too
    with pytest.raises(ValueError, match="last.ckpt, step0000008.ckpt|step0000008.ckpt, last.ckpt"):
        resolve_resume("auto", tmp_path)
    assert "last.ckpt: it holds pickled code" in capsys.readouterr().err and not marker.exists()


def test_every_checkpoint_unusable_is_refused_and_never_or_an_empty_directory_starts_fresh(tmp_path, capsys):
    for step in (4, 8):
        atomic_torch_save(_ckpt(step), tmp_path / f"step{step:07d}.ckpt")
    flip_tensor_bytes(tmp_path / "step0000008.ckpt")
    with open(tmp_path / "step0000004.ckpt", "r+b") as f:
        f.truncate(100)
    (tmp_path / "step0000002.ckpt").write_bytes(bytes(4096))  # zeroed
    (tmp_path / "step0000001.ckpt").write_bytes(os.urandom(4096))  # garbage
    with pytest.raises(ValueError) as refused:
        resolve_resume("auto", tmp_path)
    message = str(refused.value)
    assert "\n" not in message and message.count(". ") == 0 and "resume=never" in message
    assert "found 4 checkpoint(s)" in message
    skipped = capsys.readouterr().err.strip().splitlines()
    assert len(skipped) == 4 and "step0000008.ckpt: its contents do not match its checksum" in skipped[0]
    assert all("not a complete checkpoint" in line for line in skipped[1:])
    assert resolve_resume("never", tmp_path) is None

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "step0000004.ckpt.tmp").write_bytes(b"a write killed before its rename")
    assert resolve_resume("auto", empty) is None and resolve_resume("auto", tmp_path / "missing") is None


def _dcp_dir(directory: Path, step: int) -> Path:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": optimizer.state_dict()}, checkpoint_id=directory,
             no_dist=True)
    torch.save({"global_step": step}, directory / "meta.pt")
    write_manifest(directory, {name: file_sha256(directory / name) for name in manifest_files(directory)})
    return directory


def test_sharded_directories_are_verified_per_file_and_their_metadata_without_running_code(tmp_path, capsys):
    _dcp_dir(tmp_path / "step0000004.ckpt", 4)
    newer = _dcp_dir(tmp_path / "step0000008.ckpt", 8)
    assert find_resume_checkpoint(tmp_path) == newer
    (newer / INCOMPLETE).write_bytes(b"")  # being rewritten in place: not a candidate, not an error
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step0000004.ckpt"
    (newer / INCOMPLETE).unlink()
    shard = next(newer.glob("*.distcp"))
    _flip(shard, shard.stat().st_size // 2)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step0000004.ckpt"
    assert f"its file {shard.name} does not match its checksum" in capsys.readouterr().err

    marker = tmp_path / "code_ran"
    crafted = _dcp_dir(tmp_path / "step0000012.ckpt", 12)
    (crafted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))  # torch's reader would run this
    write_manifest(crafted, {name: file_sha256(crafted / name) for name in manifest_files(crafted)})
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step0000004.ckpt" and not marker.exists()
    assert "step0000012.ckpt: it holds pickled code" in capsys.readouterr().err


def test_prune_keeps_the_newest_and_the_resumed_checkpoint(tmp_path):
    for step in (2, 4, 6, 8, 10):
        atomic_torch_save(_ckpt(step), tmp_path / f"step{step:07d}.ckpt")
    atomic_torch_save(_ckpt(6), tmp_path / "preempted-step0000006.ckpt")
    removed = prune_step_checkpoints(tmp_path, keep=2, resume_step=6, resume_from=tmp_path / "last.ckpt")
    assert sorted(p.name for p in removed) == ["step0000002.ckpt"]  # steps 8, 10 > 6 were skipped: left alone
    assert not sidecar(tmp_path / "step0000002.ckpt").exists()
    removed = prune_step_checkpoints(tmp_path, keep=0, resume_step=6, resume_from=tmp_path / "step0000006.ckpt")
    assert [p.name for p in removed] == ["step0000004.ckpt"]  # never the checkpoint being resumed from
    assert prune_step_checkpoints(tmp_path, keep=-1, resume_step=10, resume_from=None) == []
    assert (tmp_path / "preempted-step0000006.ckpt").exists()  # PreemptionCallback's own, not ModelCheckpoint's


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
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _fit(directory: Path, max_steps: int, ckpt_path: str | None = None) -> None:
    checkpointing = ModelCheckpoint(dirpath=directory, filename="step{step:07d}", auto_insert_metric_name=False,
                                    every_n_train_steps=2, save_last=True, save_top_k=1, monitor="step", mode="max")
    trainer = L.Trainer(max_steps=max_steps, plugins=[AtomicCheckpointIO()], callbacks=[checkpointing,
                        ResumeStateCallback()], logger=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=directory)
    trainer.fit(_Regression(), ckpt_path=ckpt_path)


def test_old_step_checkpoints_left_by_a_kill_are_pruned_after_the_resume(tmp_path):
    _fit(tmp_path, 6)
    for step in (2, 4):  # what a kill between a save and ModelCheckpoint's removal of the older file leaves
        shutil.copy(tmp_path / "step0000006.ckpt", tmp_path / f"step{step:07d}.ckpt")
        shutil.copy(sidecar(tmp_path / "step0000006.ckpt"), sidecar(tmp_path / f"step{step:07d}.ckpt"))
    _fit(tmp_path, 10, ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step0000010.ckpt"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == ["last.ckpt.sha256", "step0000010.ckpt.sha256"]
