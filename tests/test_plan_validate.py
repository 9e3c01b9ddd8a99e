"""Every plan fw-plan writes passes the training config's validation, keeps its time within the budget, and
trains: for each objective and a grid of budgets, the written experiment composes, validates on the plan's
GPU, and (with the shape overridden to tiny) trains for 2 steps on the CPU."""

from __future__ import annotations

import json
import math

import pytest

from framework.commands import plan as plan_cli
from framework.scaling.experiment import write_plan
from framework.config import to_run_config
from framework.distributed.precision import DeviceInfo
from framework.validate import validate

OBJECTIVES = ["clm", "mlm", "span_corruption"]
BUDGETS = [["--flops", "1e19"], ["--gpu-hours", "1000"], ["--pf-days", "1000"]]
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", True)


def _tiny_shape(family: str) -> list[str]:
    """Overrides that keep the plan's experiment (objective, strategy, schedule) but make it train on a CPU."""
    shape = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.head_dim=16",
             "model.d_ff=128", "model.max_seq_len=64", f"model.n_decoder_layers={2 if family == 'encoder_decoder' else 0}"]
    run = ["data.seq_len=64", "data.micro_batch_size=4", "data.vocab_size=512", "data.max_documents=400",
           "data.num_proc=1", "data.val_windows=4", "trainer.max_steps=2", "trainer.accumulate_grad_batches=1",
           "trainer.devices=1", "trainer.num_nodes=1", "trainer.val_check_interval=1000", "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", "strategy=auto", "precision=fp32", "callbacks.model_card=false"]
    return shape + run


def _write_plan(tmp_path, objective: str, budget: list[str]) -> dict:
    name = f"p_{objective}_{budget[0].strip('-').replace('-', '_')}"
    assert plan_cli.main(budget + ["--objective", objective, "--name", name, "--conf-dir", str(tmp_path)]) == 0
    planned = json.loads((tmp_path / "experiment" / f"{name}.plan.json").read_text())
    planned["experiment"] = name
    return planned


def _compose_plan(compose, tmp_path, planned: dict, extra: list[str] = ()):
    return to_run_config(compose([f"hydra.searchpath=[file://{tmp_path}]", f"experiment={planned['experiment']}",
                                  *extra], tiny=False))


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: " ".join(b))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_written_plan_composes_validates_and_fits_its_budget(objective, budget, tmp_path, compose, capsys):
    planned = _write_plan(tmp_path, objective, budget)
    cfg = _compose_plan(compose, tmp_path, planned)
    validate(cfg, device=H100)  # the plan as written, on the GPU it was planned for
    assert cfg.data.seq_len == planned["seq_len"] and cfg.objective.name == objective
    # one FLOP count: the exact count spends the budget, whole steps within it
    assert planned["budget_flops"] - planned["flops_per_step"] < planned["flops_exact"] <= planned["budget_flops"]
    if budget[0] == "--gpu-hours":
        assert planned["gpu_hours"] <= float(budget[1])
    if objective == "span_corruption":  # the default --seq-len 2048 would need 114 sentinels of 100
        assert planned["seq_len"] <= 1809 and any("lowered" in n for n in planned["notes"])


def _trains_two_steps(objective, budget, tmp_path, compose, data_cache):
    from framework.run import run

    planned = _write_plan(tmp_path, objective, budget)
    cfg = _compose_plan(compose, tmp_path, planned,
                        _tiny_shape(planned["model"]["family"]) + [f"data.cache_dir={data_cache}"])
    assert cfg.objective.name == objective and cfg.optim.lr == pytest.approx(planned["lr"], rel=1e-2)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["step"] == 2 and math.isfinite(metrics["val_loss_nats"])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_plan_trains_two_steps_at_tiny_size(objective, tmp_path, compose, data_cache):
    _trains_two_steps(objective, BUDGETS[1], tmp_path, compose, data_cache)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [BUDGETS[0], BUDGETS[2]], ids=lambda b: " ".join(b))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_plan_trains_two_steps_at_tiny_size(objective, budget, tmp_path, compose, data_cache):
    _trains_two_steps(objective, budget, tmp_path, compose, data_cache)


def test_a_plan_training_would_refuse_is_not_written(tmp_path):
    import dataclasses

    from framework.scaling.planner import PlanRequest, make_budget, make_plan

    plan = make_plan(PlanRequest(budget=make_budget(flops=1e19), seq_len=1024))
    broken = dataclasses.replace(plan, seq_len=4096)  # beyond the model's max_seq_len of 1024
    with pytest.raises(ValueError, match=r"the plan would not train: data.seq_len=4096 exceeds model.max_seq_len=1024"):
        write_plan(broken, "broken", tmp_path)
    assert not (tmp_path / "experiment").exists()
    assert write_plan(plan, "fine", tmp_path)["experiment"].exists()
