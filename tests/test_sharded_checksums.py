"""Sharded (FSDP2 / torch.distributed.checkpoint) checkpoints of a real 2-rank run carry a checksum manifest,
pass the metadata check that runs no pickled code, and a corrupted shard is skipped
(framework/distributed/sharded_checksums.py, integrity.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from framework.distributed.integrity import INCOMPLETE, MANIFEST, manifest_files, read_checksums
from framework.distributed.resume import checkpoint_problem, scan_checkpoints

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
