"""The planner end to end: exact parameter counts of built models, strategy choice, time, the written
experiment composing and training on CPU, and one-sentence errors for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework import catalogue
from framework.commands import plan as plan_cli
from framework.models import build_model
from framework.models.config import ModelConfig
from framework.objectives.config import ObjectiveConfig
from framework.scaling import laws, planner
from framework.scaling.hardware import peak_flops
from framework.scaling.memory import estimate_memory
from framework.scaling.planner import PlanRequest, make_budget, make_plan
from framework.scaling.shapes import ShapeFamily, search_shape

REPO = Path(__file__).resolve().parent.parent
FAMILIES = list(catalogue.FAMILIES)


def _unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_built_model_has_the_planned_parameter_count(family):
    law = laws.BESIROGLU_2024
    for budget, vocab in ((3e14, 512), (1e18, 8192), (1e21, 32000)):
        n_opt, _ = law.optimal_allocation(budget)
        cfg, n_planned = search_shape(family, n_opt, vocab, 512)
        with torch.device("meta"):  # no memory: counts only
            model = build_model(cfg)
        assert _unique_numel(model) == n_planned == cfg.num_parameters()
        # tiny models come in coarse steps (one layer of d=128 is 17 % of 1.3M parameters, an encoder-decoder adds
        # a layer to both stacks); large ones are dense
        assert abs(n_planned / n_opt - 1) < (0.15 if n_opt < 1e7 else 0.02)
        shapes = ShapeFamily()
        assert shapes.min_aspect <= cfg.d_model / cfg.n_layers <= shapes.max_aspect
        assert cfg.head_dim == shapes.head_dim(cfg.d_model) and cfg.n_heads * cfg.head_dim == cfg.d_model


def test_the_planner_reads_the_objective_schema_without_loading_lightning():
    """The planner's masking and span settings are ObjectiveConfig's defaults (not a copy), and neither it nor
    the schemas import Lightning (fw-plan stays fast)."""
    import subprocess
    import sys

    code = ("import sys; import framework.scaling.planner as p; from framework.objectives.config import ObjectiveConfig;"
            "assert p.OBJECTIVE_DEFAULTS == ObjectiveConfig(); print(sorted(m for m in sys.modules if 'lightning' in m))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr + done.stdout
    d = ObjectiveConfig()
    assert planner.sequence_lengths("mlm", 1000) == (None, round(d.mask_probability * 1000))


def test_plan_under_the_twenty_tokens_rule_follows_chinchilla_table_3():
    # Table 3's budgets -> about its parameters; its tokens (C = 6ND) scaled by 6ND / exact FLOPs, since the plan
    # spends C with the exact count (the one its time estimate uses)
    for n_table, c, d_table in [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                                (175e9, 3.85e24, 3.7e12)]:
        p = make_plan(PlanRequest(budget=make_budget(flops=c), law="tokens_per_param", n_gpus=64, seq_len=2048))
        exact_over_6nd = p.flops_exact / p.flops_6nd
        assert p.n_params == pytest.approx(n_table, rel=0.06)
        assert p.tokens == pytest.approx(d_table / exact_over_6nd, rel=0.08)
        assert p.tokens_per_param == pytest.approx(20.0 * p.n_opt**2 / p.n_params**2 / exact_over_6nd, rel=0.01)
        assert c - p.flops_per_step < p.flops_exact <= c  # whole steps within the budget


@pytest.mark.parametrize("law", [laws.HOFFMANN_2022, laws.BESIROGLU_2024], ids=lambda l: l.name)
def test_plan_uses_the_closed_form_allocation(law):
    for c in (1e19, 1e22):
        p = make_plan(PlanRequest(budget=make_budget(flops=c), law=law.name, n_gpus=64))
        g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
        a, b = law.beta / (law.alpha + law.beta), law.alpha / (law.alpha + law.beta)
        assert p.n_opt == pytest.approx(g * (c / 6) ** a, rel=1e-12)
        assert p.d_opt == pytest.approx((c / 6) ** b / g, rel=1e-12)
        assert p.predicted_loss_at_opt == pytest.approx(law.E + law.A / p.n_opt**law.alpha + law.B / p.d_opt**law.beta)
        assert any("N_opt = G (C/6)^a" in eq for eq in p.equations)


def test_strategy_is_the_cheapest_that_fits_and_time_is_consistent():
    req = PlanRequest(budget=make_budget(gpu_hours=20000, gpu="A100-40GB", mfu=0.45, precision="bf16"),
                      gpu="A100-40GB", n_gpus=16, gpus_per_node=8, mfu=0.45, precision="bf16", seq_len=2048)
    p = make_plan(req)
    cfg = p.model_config()
    order = list(catalogue.STRATEGIES)
    chosen = order.index(p.strategy)
    assert p.chosen_memory["total_gb"] <= 0.9 * 40
    for option in order[:chosen]:  # every cheaper usable strategy fails even at micro-batch 1
        if option == "auto" or planner.refusal(option, "bf16", "A100-40GB"):
            continue
        est = estimate_memory(cfg, p.n_params, option, "bf16", 16, 1, 2048, gpus_per_node=8,
                              checkpointing=p.activation_checkpointing)
        assert not est.fits(40e9), option
    assert p.strategy != "ddp"  # ~4B parameters x 16 bytes do not fit 40 GB replicated
    # time: exact FLOPs at 45 % of 16 A100s; the GPU-hours are the budget's, less under one step (one FLOP count)
    assert p.wall_clock_hours == pytest.approx(p.flops_exact / (16 * peak_flops("A100", "bf16") * 0.45) / 3600)
    assert p.gpu_hours == pytest.approx(20000 * p.flops_exact / p.budget_flops, rel=1e-9)
    assert 20000 * (1 - 1 / p.steps) < p.gpu_hours <= 20000
    assert p.global_batch == p.micro_batch * p.accumulate_grad_batches * 16
    # fp16 is refused with FSDP (no sharded loss scaler), so an fp16 plan never picks an FSDP option
    p16 = make_plan(PlanRequest(budget=make_budget(flops=1e22), gpu="A100-40GB", n_gpus=16, precision="fp16"))
    assert not p16.strategy.startswith("fsdp")


def test_plan_experiment_composes_and_trains_on_cpu(tmp_path, compose, data_cache):
    from framework.config import to_run_config
    from framework.run import run

    conf_root = tmp_path / "conf"
    rc = plan_cli.main(["--flops", "1e13", "--gpus", "1", "--precision", "fp32", "--seq-len", "64",
                        "--vocab-size", "512", "--name", "planned_tiny", "--conf-dir", str(conf_root), "--json"])
    assert rc == 0
    planned = json.loads((conf_root / "experiment" / "planned_tiny.plan.json").read_text())
    assert (conf_root / "experiment" / "planned_tiny.plan.md").read_text().startswith("# Compute-optimal plan")
    assert planned["strategy"] == "auto" and planned["precision"] == "fp32"
    # the plan as written (model, vocab, seq_len, micro-batch, strategy, precision), on a slice of the corpus
    cfg = compose([f"hydra.searchpath=[file://{conf_root}]", "experiment=planned_tiny", "trainer.max_steps=2",
                   "data.max_documents=800", f"data.cache_dir={data_cache}", "data.num_proc=1", "data.val_windows=4",
                   "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"], tiny=False)
    assert cfg.model.d_model == planned["model"]["d_model"] and cfg.model.n_layers == planned["model"]["n_layers"]
    assert cfg.data.micro_batch_size == planned["micro_batch"] and cfg.optim.lr == pytest.approx(planned["lr"], rel=1e-2)
    assert cfg.strategy.name == "auto" and cfg.precision.mode == "32-true"
    metrics = run(to_run_config(cfg), tmp_path / "run")
    assert metrics["step"] == 2 and math.isfinite(metrics["val_loss_nats"])
    assert metrics["parameters"] == planned["n_params"]


def _error(argv, capsys) -> str:
    rc = plan_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0 and err.startswith("fw-plan: error: ") and err.endswith(".")
    return err


def test_bad_input_gets_one_sentence_and_nonzero_exit(tmp_path, capsys):
    out = ["--conf-dir", str(tmp_path)]
    assert "too small" in _error(["--flops", "1e9"] + out, capsys)
    assert "unknown GPU 'B300'" in _error(["--flops", "1e20", "--gpu", "B300"] + out, capsys)
    assert "positive number" in _error(["--flops", "-3e20"] + out, capsys)
    assert "positive number" in _error(["--gpu-hours", "lots"] + out, capsys)
    assert "exactly one budget" in _error(out, capsys)
    assert "--mfu" in _error(["--gpu-hours", "100", "--mfu", "1.5"] + out, capsys)
    assert "unknown objective" in _error(["--flops", "1e20", "--objective", "dpo"] + out, capsys)
    assert not list(tmp_path.rglob("*.yaml"))  # nothing written on error


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "framework", "plan", "--pf-days", "0.5", "--objective",
                           "span_corruption", "--seq-len", "512", "--name", "t5_plan", "--conf-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "N_opt = G (C/6)^a" in proc.stdout and "t5_plan" in proc.stdout
    text = (tmp_path / "experiment" / "t5_plan.yaml").read_text()
    assert text.startswith("# @package _global_") and "override /objective: span_corruption" in text


@pytest.mark.parametrize("objective", ["mlm", "span_corruption"])
def test_plans_for_other_objectives_compose_and_validate(objective, tmp_path, compose):
    from framework.config import resolve_model, to_run_config

    assert plan_cli.main(["--pf-days", "1", "--objective", objective, "--gpus", "16", "--seq-len", "512",
                          "--name", f"p_{objective}", "--conf-dir", str(tmp_path)]) == 0
    planned = json.loads((tmp_path / "experiment" / f"p_{objective}.plan.json").read_text())
    cfg = to_run_config(compose([f"hydra.searchpath=[file://{tmp_path}]", f"experiment=p_{objective}"], tiny=False))
    assert cfg.objective.name == objective and cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    model = resolve_model(cfg.model).replace(vocab_size=cfg.data.vocab_size)
    assert model.family == catalogue.OBJECTIVES[objective].family
    assert model.num_parameters() == planned["n_params"]
    assert cfg.precision.mode == "bf16-mixed" and cfg.strategy.name in ("ddp", "fsdp", "deepspeed")
