"""DDP and FSDP2 give the losses of a single process with the same global batch (2 CPU ranks, gloo).

The datamodule gives rank r the r-th block of B positions of every 2B of the global window order, so two ranks
with micro-batch B see, at every step, exactly the 2B windows a single process with micro-batch 2B sees. Tolerance: |Δloss| <= 1e-4
nats per step (float32; only the order of floating-point reductions differs). Adam divides out a global
gradient scale, so these checks catch gradients that are not synchronised or parameters that are not restored
after sharding, not a sum-vs-mean mix-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework.config import to_run_config
from framework.run import build_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_workers.launch import TINY_RUN, torchrun, train  # noqa: E402
from dist_workers.train_worker import Record  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def single_process(compose, tiny_prepared, data_cache, tmp_path_factory) -> dict:
    """The reference: one process, micro-batch 8 (= 2 ranks x 4)."""
    out = tmp_path_factory.mktemp("single")
    cfg = to_run_config(compose(TINY_RUN + [f"data.cache_dir={data_cache}", "data.micro_batch_size=8",
                                            "strategy=auto", "trainer.devices=1"], tiny=False))
    trainer, module, dm, _ = build_run(cfg, out / "run")
    trainer.callbacks.append(Record(out))
    trainer.fit(module, datamodule=dm)
    return json.loads((out / "result.json").read_text())


def two_ranks(strategy: str, data_cache: str, tmp_path_factory, *extra: str) -> dict:
    overrides = [f"data.cache_dir={data_cache}", "data.micro_batch_size=4", "trainer.devices=2", f"strategy={strategy}",
                 *extra]
    return train(tmp_path_factory.mktemp(strategy), overrides)


@pytest.mark.slow
def test_lightning_ddp_matches_single_process(single_process, tiny_prepared, data_cache, tmp_path_factory):
    ddp = two_ranks("ddp", data_cache, tmp_path_factory)
    assert ddp["world_size"] == 2 and single_process["world_size"] == 1
    assert ddp["local_numel"] == single_process["local_numel"]  # every rank holds the whole model
    assert len(ddp["losses"]) == len(single_process["losses"]) == 6
    assert ddp["losses"] == pytest.approx(single_process["losses"], abs=ATOL)
    assert ddp["losses"][-1] < ddp["losses"][0] - 0.05  # it trains: the comparison is not between flat lines


@pytest.mark.slow
def test_lightning_fsdp2_matches_single_process(single_process, tiny_prepared, data_cache, tmp_path_factory):
    # activation checkpointing on as well: recomputation must not change a single loss
    fsdp = two_ranks("fsdp", data_cache, tmp_path_factory, "strategy.activation_checkpointing=true")
    assert fsdp["world_size"] == 2
    assert fsdp["local_numel"] <= single_process["local_numel"] // 2 + 64  # each rank holds about half
    assert fsdp["losses"] == pytest.approx(single_process["losses"], abs=ATOL)
    ckpt = fsdp["out"] / "run" / "checkpoints" / "step0000003.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per rank


@pytest.mark.slow
def test_fsdp2_sharding_variants_match_ddp(tmp_path):
    """full, shard-grad-op (ZeRO-2-like), hybrid (2 replicas x 1 shard) and full + activation checkpointing."""
    torchrun("fsdp_worker.py", tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    ddp = r["losses"]["ddp"]
    assert ddp[-1] < ddp[0] - 0.3
    for name in ("full", "shard_grad_op", "hybrid", "full_checkpointed"):
        assert r["losses"][name] == pytest.approx(ddp, abs=ATOL), name
    half = r["total_numel"] // 2
    assert r["local_numel"]["full"] <= half + 64 and r["local_numel"]["shard_grad_op"] <= half + 64
    assert r["local_numel"]["hybrid"] == r["total_numel"]  # sharded over a group of 1, replicated over 2
    assert r["mesh"]["hybrid"] == ["replicate", "shard"] and r["mesh"]["full"] == ["shard"]
    # full sharding frees a block's gathered parameters after its forward; shard-grad-op keeps them for backward
    assert r["resharded_after_forward"]["full"] is True
    assert r["resharded_after_forward"]["shard_grad_op"] is False
