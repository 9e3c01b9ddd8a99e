"""Sharded (FSDP2 / torch.distributed.checkpoint) checkpoints of a real 2-rank run carry a checksum manifest,
pass the metadata check that runs no pickled code, and a corrupted shard is skipped
(framework/checkpointing/sharded_checksums.py, integrity.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from framework.checkpointing.integrity import INCOMPLETE, MANIFEST, manifest_files, read_checksums
from framework.checkpointing.resume import checkpoint_problem, scan_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_workers.launch import train  # noqa: E402


@pytest.fixture(scope="module")
def fsdp_run(tiny_prepared, data_cache, tmp_path_factory) -> dict:
    """The same run as tests/test_fsdp.py and tests/test_consolidate.py (run once when they share a session)."""
    return train(tmp_path_factory.mktemp("fsdp"), [f"data.cache_dir={data_cache}", "data.micro_batch_size=4",
                                                  "trainer.devices=2", "strategy=fsdp",
                                                  "strategy.activation_checkpointing=true"])


@pytest.mark.slow
def test_fsdp_checkpoints_carry_a_manifest_and_a_corrupted_shard_is_skipped(fsdp_run, tmp_path, capsys):
    ckpt_dir = fsdp_run["out"] / "run" / "checkpoints"
    directories = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
    assert directories == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt"]
    for name in directories:
        directory = ckpt_dir / name
        listed = read_checksums(directory / MANIFEST)
        assert sorted(listed) == manifest_files(directory)  # every file the strategy wrote, hashed by 2 ranks
        assert {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"} <= set(listed)
        assert not (directory / INCOMPLETE).exists()
        assert checkpoint_problem(directory) == (None, True)  # verified, metadata readable without pickled code

    copy = tmp_path / "checkpoints"
    shutil.copytree(ckpt_dir, copy)
    shard = copy / "last.ckpt" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    chosen, skipped = scan_checkpoints(copy)
    assert chosen == copy / "step0000006.ckpt" and [p.name for p, _ in skipped] == ["last.ckpt"]
    assert "its file __1_0.distcp does not match its checksum" in capsys.readouterr().err


class _OneRank:
    """The part of a Lightning strategy the wrapper uses, with one rank and a save that ``write`` performs."""

    _save_distributed_checkpoint = True
    is_global_zero, global_rank, world_size = True, 0, 1

    def __init__(self, write) -> None:
        self.write = write

    def broadcast(self, obj):
        return obj

    def barrier(self, name=None) -> None:
        pass

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        self.write(Path(filepath))


def _wrapped(write) -> _OneRank:
    from types import SimpleNamespace

    from framework.checkpointing.sharded_checksums import ShardedChecksums

    strategy = _OneRank(write)
    ShardedChecksums().setup(SimpleNamespace(strategy=strategy), None, "fit")
    return strategy


def test_a_sharded_rewrite_is_marked_incomplete_until_its_manifest_is_written(tmp_path):
    seen_marker = []

    def write(path: Path) -> None:
        seen_marker.append((path / INCOMPLETE).exists())
        (path / "shard_0").write_bytes(b"new shard " * 100)

    last = tmp_path / "last.ckpt"
    last.mkdir()
    (last / "shard_0").write_bytes(b"old shard")
    (last / MANIFEST).write_text("0" * 64 + "  shard_0\n")  # the previous save's manifest
    _wrapped(write).save_checkpoint({"state_dict": {}}, last)
    assert seen_marker == [True] and not (last / INCOMPLETE).exists()
    assert sorted(read_checksums(last / MANIFEST)) == ["shard_0"]
    from framework.checkpointing.integrity import verify_checksums

    assert verify_checksums(last) == (None, True)


def test_a_sharded_save_that_fills_the_disk_is_removed_and_reported_in_one_sentence(tmp_path):
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from framework.checkpointing.checkpoints import CheckpointWriteError

    earlier = tmp_path / "step0000004.ckpt"
    earlier.mkdir()
    (earlier / "__0_0.distcp").write_bytes(b"x" * 300_000)

    def write(path: Path) -> None:
        (path / "__0_0.distcp").write_bytes(b"partial")
        raise CheckpointException("save failed", {0: (OSError(28, "No space left on device"), None)})

    target = tmp_path / "step0000008.ckpt"
    with pytest.raises(CheckpointWriteError) as failed:
        _wrapped(write).save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, target)
    message = str(failed.value)
    assert message.startswith(f"could not write checkpoint {target} (No space left on device): it needs about 0.3 MiB")
    assert "\n" not in message and not target.exists() and (earlier / "__0_0.distcp").stat().st_size == 300_000
    with pytest.raises(ValueError, match="not a disk problem"):  # other failures propagate unchanged
        _wrapped(lambda path: (_ for _ in ()).throw(ValueError("not a disk problem"))).save_checkpoint({}, target)
