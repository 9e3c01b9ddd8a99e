"""Learning-rate schedules: WSD values against Hägele et al. 2024's formulas, cooldown branches, bad settings."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from framework.config import to_run_config
from framework.objectives.config import OptimConfig, check_optim
from framework.objectives.schedules import lr_lambda
from framework.run import build_run, run
from stop_at import StopAt

REPO = Path(__file__).resolve().parent.parent


# 100 steps, warmup 10, decay over the last 20 (steps 80..99), floor 0.1; p = (step - 80) / 20
@pytest.mark.parametrize("shape, step, expected", [
    ("linear", 90, 0.1 + 0.9 * 0.5),                       # p = 0.5
    ("linear", 99, 0.1 + 0.9 * (1 - 19 / 20)),
    ("cosine", 85, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    ("cosine", 90, 0.1 + 0.9 * 0.5),                       # cos(pi/2) = 0
    ("1-sqrt", 85, 0.1 + 0.9 * 0.5),                       # sqrt(0.25) = 0.5
    ("1-sqrt", 96, 0.1 + 0.9 * (1 - math.sqrt(0.8))),
])
def test_wsd_decay_equals_the_formula(shape, step, expected):
    assert lr_lambda(step, 10, 100, 0.1, "wsd", 0.2, shape) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_phases(shape):
    lrs = [lr_lambda(s, 10, 100, 0.1, "wsd", 0.2, shape) for s in range(120)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup
    assert lrs[10:81] == [1.0] * 71  # the stable phase, through the first step of the decay (p = 0)
    assert all(a > b for a, b in zip(lrs[80:100], lrs[81:100]))  # strictly decreasing while decaying
    assert lrs[100:] == [pytest.approx(0.1)] * 20  # the floor after max_steps


def test_cosine_is_unchanged():
    assert lr_lambda(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine


@pytest.mark.parametrize("field, value, words", [
    ("decay_fraction", 0.0, "must be in (0, 1]"), ("decay_fraction", 1.5, "must be in (0, 1]"),
    ("decay_shape", "exp", "not one of linear, cosine, 1-sqrt"), ("schedule", "step", "not one of cosine, wsd"),
])
def test_bad_schedule_settings_are_refused(field, value, words):
    optim = OptimConfig(**{"schedule": "wsd", "warmup_steps": 10, field: value})
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_optim(optim, 100)


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_cooldown_branch_equals_the_schedule_run_straight_through(compose, tmp_path):
    common = ["optim.schedule=wsd", "optim.decay_fraction=0.25", "trainer.val_check_interval=1000",
              "trainer.log_every_n_steps=1", "callbacks.checkpoint_every_n_steps=10", "optim.lr=3e-3",
              "callbacks.throughput=false", "callbacks.model_card=false"]
    straight = tmp_path / "straight"
    run(to_run_config(compose(common + ["trainer.max_steps=24"])), straight)  # decay over steps 18..23

    long_cfg = to_run_config(compose(common + ["trainer.max_steps=1000"]))  # its decay would start at step 750
    trainer, module, dm, _ = build_run(long_cfg, tmp_path / "long")
    trainer.callbacks.append(StopAt(10))
    trainer.fit(module, datamodule=dm)
    branch_ckpt = tmp_path / "long" / "checkpoints" / "step0000010.ckpt"

    branch = tmp_path / "branch"
    run(to_run_config(compose(common + ["trainer.max_steps=24", f"branch_from={branch_ckpt}"])), branch)
    full, cooled = _losses(straight), _losses(branch)
    assert sorted(cooled) == list(range(10, 24))
    for step in cooled:
        assert cooled[step] == pytest.approx(full[step], abs=1e-6), step


def test_branch_past_the_constant_phase_is_refused_before_data(tmp_path):
    """A branch whose decay would start before the checkpoint's step: one sentence, exit 2, no data prepared."""
    ckpt = tmp_path / "step0000020.ckpt"
    import torch

    torch.save({"global_step": 20, "lr_schedulers": [{"_last_lr": [1e-3], "base_lrs": [1e-3]}]}, ckpt)
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "framework", "train", *TINY, f"data.cache_dir={cache}", f"run_dir={tmp_path / 'run'}",
         "optim.schedule=wsd", "optim.decay_fraction=0.5", "trainer.max_steps=30", f"branch_from={ckpt}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "past the start of this run's decay (step 15" in lines[0], proc.stderr[-2000:]
    assert not cache.exists()
