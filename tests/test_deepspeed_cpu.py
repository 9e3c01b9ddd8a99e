"""DeepSpeed ZeRO 1, 2, 3 (and 2 with the optimizer offloaded) on the CPU, from the config the framework generates.

Lightning's DeepSpeedStrategy refuses anything but CUDA (that path is bench/strategy_precision.py's), so
this builds ``deepspeed.initialize`` engines directly with ``DS_ACCELERATOR=cpu`` in 2 processes (gloo),
around the framework's CausalLM, torch AdamW, LR schedule and clipping, next to torch DDP on the same
initial weights and global batches. Tolerances: losses |Δ| <= 1e-4 nats per step; consolidated weights
exactly equal to what the ranks held; Adam moments equal to DDP's within 1e-6 (float32, reduction order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpointing.consolidate import checkpoint_kind, consolidate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_workers.launch import torchrun  # noqa: E402

ENGINES = ("zero1", "zero2", "zero3", "zero2_offload")

import deepspeed  # noqa: F401  (a declared dependency: missing it is a failure, not a skip)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun("deepspeed_worker.py", out, env={"DS_ACCELERATOR": "cpu"})
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_zero_stages_match_ddp_losses(engines):
    _, r = engines
    assert r["world_size"] == 2 and r["backend"] == "gloo"
    ddp = r["losses"]["ddp"]
    assert ddp[-1] < ddp[0] - 0.3  # it trains
    for name in ENGINES:
        assert r["losses"][name] == pytest.approx(ddp, abs=1e-4), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINES)
def test_consolidated_zero_checkpoint_has_the_weights_and_adam_moments(engines, name, tmp_path):
    out, _ = engines
    assert checkpoint_kind(out / name) == "deepspeed"
    consolidate(out / name, tmp_path / "full.ckpt")
    ckpt = torch.load(tmp_path / "full.ckpt", map_location="cpu", weights_only=True)
    held = torch.load(out / f"{name}_weights.pt", weights_only=True)
    assert list(ckpt["state_dict"]) == list(held)  # "model.<...>" keys, as a DDP run saves
    for key, value in held.items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    assert ckpt["global_step"] == 6 and "model_config" in ckpt["hyper_parameters"]
    # the optimizer state in torch's format, loadable by the DDP run's AdamW: compare with DDP's own
    ddp = torch.load(out / "ddp_optimizer.pt", weights_only=True)
    ours = ckpt["optimizer_states"][0]
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in ddp["param_groups"]]
    assert [g["weight_decay"] for g in ours["param_groups"]] == [0.1, 0.0]
    for i, state in ddp["state"].items():
        assert float(ours["state"][i]["step"]) == float(state["step"]) == 6
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][i][moment], state[moment], rtol=0, atol=1e-6)
