"""Sharded checkpoints: saved by FSDP2 (2 CPU ranks), consolidated into one file, loaded and resumed.

- consolidating the final sharded checkpoint gives exactly the weights the ranks held (gathered in memory);
- the file loads with weights_only=True, has a DDP run's state_dict keys, and framework.export reads it;
- resuming under FSDP from the sharded step-3 directory, and under DDP from its consolidated file, both
  reproduce the uninterrupted run's losses at steps 3-5 (|Δ| <= 1e-5 nats: same weights, optimizer moments,
  LR schedule and data position).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.checkpointing.consolidate import checkpoint_kind, consolidate
from framework.commands.consolidate import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_workers.launch import train  # noqa: E402


@pytest.fixture(scope="module")
def fsdp_run(tiny_prepared, data_cache, tmp_path_factory) -> dict:
    """The same run as tests/test_fsdp.py (shared when both files run in one session)."""
    return train(tmp_path_factory.mktemp("fsdp"), [f"data.cache_dir={data_cache}", "data.micro_batch_size=4",
                                                  "trainer.devices=2", "strategy=fsdp",
                                                  "strategy.activation_checkpointing=true"])


@pytest.mark.slow
def test_consolidated_fsdp_checkpoint_has_the_exact_weights(fsdp_run, tmp_path):
    last = fsdp_run["out"] / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(last) == "dcp"
    main([str(last), str(tmp_path / "full.ckpt")])
    ckpt = torch.load(tmp_path / "full.ckpt", map_location="cpu", weights_only=True)
    gathered = torch.load(fsdp_run["out"] / "final_weights.pt", weights_only=True)
    assert list(ckpt["state_dict"]) == list(gathered)
    for name, value in gathered.items():
        assert torch.equal(ckpt["state_dict"][name], value), name
    assert ckpt["global_step"] == 6 and ckpt["hyper_parameters"]["model_config"]["n_layers"] == 2
    # a DDP / single-device run's keys (plain module, no FSDP or wrapper prefixes)
    from framework.models import ModelConfig, build_model

    model = build_model(ModelConfig(**ckpt["hyper_parameters"]["model_config"]))
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in model.state_dict()}
    # torch optimizer format: parameter indices, Adam moments shaped like their parameters
    opt = ckpt["optimizer_states"][0]
    params = [p for p in dict(model.named_parameters()).values()]  # tied lm_head appears once
    assert sorted(opt["state"]) == list(range(len(params)))
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(params)
    for i, state in opt["state"].items():
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape and float(state["step"]) == 6
    from framework.export import load_checkpoint

    _, _, state, _ = load_checkpoint(tmp_path / "full.ckpt")
    assert torch.equal(state["embed.weight"], gathered["model.embed.weight"])


@pytest.mark.slow
def test_resume_from_sharded_under_fsdp_and_from_consolidated_under_ddp(fsdp_run, data_cache, tmp_path_factory):
    step3 = fsdp_run["out"] / "run" / "checkpoints" / "step0000003.ckpt"
    full3 = tmp_path_factory.mktemp("consolidated") / "step3.ckpt"
    consolidate(step3, full3)
    common = [f"data.cache_dir={data_cache}", "data.micro_batch_size=4", "trainer.devices=2"]
    same = train(tmp_path_factory.mktemp("fsdp_resume"), common + ["strategy=fsdp"], resume=str(step3))
    ddp = train(tmp_path_factory.mktemp("ddp_resume"), common + ["strategy=ddp"], resume=str(full3))
    for resumed in (same, ddp):
        assert resumed["first_step"] == 3
        assert resumed["losses"] == pytest.approx(fsdp_run["losses"][3:], abs=1e-5)


def test_consolidate_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "partial.ckpt").mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint file nor a complete sharded checkpoint directory"):
        consolidate(tmp_path / "partial.ckpt", tmp_path / "out.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "single.ckpt")
    with pytest.raises(ValueError, match="already a single-file checkpoint"):
        consolidate(tmp_path / "single.ckpt", tmp_path / "out.ckpt")
