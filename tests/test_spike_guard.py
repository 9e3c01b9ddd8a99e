"""Loss-spike guard: a planted spike or a poisoned gradient is skipped without touching weights or optimizer
state; every action is written to the run directory; bad settings are refused before any data."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY
from framework.callbacks.spike_guard import SpikeGuard
from framework.config import to_run_config
from framework.run import build_run

REPO = Path(__file__).resolve().parent.parent
GUARD = ["callbacks.spike_guard.enabled=true", "callbacks.spike_guard.window=20", "callbacks.spike_guard.min_history=10",
         "callbacks.spike_guard.sigma=6", "trainer.max_steps=34", "optim.lr=3e-3", "trainer.val_check_interval=1000",
         "callbacks.throughput=false", "callbacks.checkpoint_every_n_steps=1000"]


def test_zscore_rule():
    guard = SpikeGuard("/nonexistent", window=10, sigma=3.0, min_history=5)
    assert guard.reason(9.0, 1.0) == (None, None)  # too little history: only non-finite values are caught
    assert guard.reason(float("nan"), 1.0)[0] == "non-finite loss"
    assert guard.reason(1.0, float("inf"))[0] == "non-finite gradient norm"
    guard.history.extend([5.0, 5.2, 4.8, 5.1, 4.9])  # mean 5.0, sample std 0.158
    assert guard.reason(5.4, 1.0)[0] is None  # z = 2.5
    reason, z = guard.reason(5.6, 1.0)  # z = 3.79
    assert reason.startswith("loss 3.8 standard deviations") and z == pytest.approx(0.6 / 0.158114, rel=1e-4)


class _Snapshot(L.Callback):
    """Copies the weights and optimizer state before and after optimizer step ``step``; plants damage there."""

    def __init__(self, step: int, plant) -> None:
        self.step, self.plant = step, plant
        self.before = self.after = None

    def _state(self, trainer, pl_module):
        return copy.deepcopy(pl_module.model.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._state(trainer, pl_module)
            if self.plant == "batch":
                batch.fill_(4)  # a window of one token the causal LM never saw (<mask>): a loss spike

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step and self.plant == "gradient":
            next(pl_module.model.parameters()).grad[0, 0] = float("nan")  # a poisoned gradient

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self._state(trainer, pl_module)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("plant, reason", [("batch", "standard deviations"), ("gradient", "non-finite gradient norm")])
def test_planted_spike_is_skipped_and_nothing_changes(compose, tmp_path, plant, reason):
    cfg = to_run_config(compose(GUARD))
    trainer, module, dm, _ = build_run(cfg, tmp_path)
    snap = _Snapshot(30, plant)
    trainer.callbacks.append(snap)
    trainer.fit(module, datamodule=dm)
    records = [json.loads(line) for line in (tmp_path / "spike_guard.jsonl").read_text().splitlines()]
    assert [(r["step"], r["action"]) for r in records] == [(30, "skip")], records
    assert reason in records[0]["reason"]
    assert _equal(snap.before[0], snap.after[0])  # weights untouched by the skipped step
    assert _equal(snap.before[1], snap.after[1])  # so are AdamW's moments and step counts
    guard = next(c for c in trainer.callbacks if isinstance(c, SpikeGuard))
    assert guard.rollback_requested is None and trainer.global_step == 34  # training went on
    weights_end = module.model.state_dict()
    assert not _equal(snap.after[0], {k: v.cpu() for k, v in weights_end.items()})  # later steps did train


@pytest.mark.parametrize("override, words", [
    ("strategy=deepspeed_zero2", "DeepSpeed's ZeRO optimizer"), ("callbacks.spike_guard.sigma=0", "must be positive"),
])
def test_bad_guard_settings_are_refused_before_data(tmp_path, override, words):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "framework", "train", *TINY, f"data.cache_dir={cache}",
                           f"run_dir={tmp_path / 'run'}", "callbacks.spike_guard.enabled=true", override],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-2000:]
    assert not cache.exists()


def test_skip_positions_jump_over_the_skipped_ranges():
    import numpy as np

    from framework.data.datamodule import rank_positions, skip_positions

    assert skip_positions(np.arange(10), ((3, 4),)).tolist() == [0, 1, 2, 7, 8, 9, 10, 11, 12, 13]
    assert skip_positions(np.arange(6), ((1, 2), (5, 1))).tolist() == [0, 3, 4, 6, 7, 8]  # stream coordinates
    # two ranks of micro-batch 2 from global position 0, with stream positions 4..7 skipped: neither rank reads them
    both = [rank_positions(0, r, 2, 2, 0, 6, ((4, 4),)).tolist() for r in (0, 1)]
    assert sorted(both[0] + both[1]) == [0, 1, 2, 3] + list(range(8, 16))


class _PlantSpikes(L.Callback):
    """Fills the batches of ``steps`` with a never-seen token, once each (the data of a rolled-back step is
    skipped afterwards, so a second visit of the same step number reads other data)."""

    def __init__(self, steps: set[int], planted: set[int]) -> None:
        self.steps, self.planted = steps, planted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and trainer.global_step not in self.planted:
            self.planted.add(trainer.global_step)
            batch.fill_(4)


@pytest.mark.slow
def test_spikes_in_a_row_roll_back_to_the_checkpoint_before_them_and_skip_their_data(compose, tmp_path, monkeypatch):
    import framework.run as train

    planted: set[int] = set()
    original = train.build_run

    def build_run_planting(*args, **kwargs):
        trainer, module, dm, prepared = original(*args, **kwargs)
        trainer.callbacks.append(_PlantSpikes({30, 31, 32}, planted))
        return trainer, module, dm, prepared

    monkeypatch.setattr(train, "build_run", build_run_planting)
    cfg = to_run_config(compose([*GUARD, "callbacks.checkpoint_every_n_steps=10", "callbacks.keep_checkpoints=-1",
                                 "trainer.max_steps=36", "trainer.log_every_n_steps=1"]))
    metrics = train.run(cfg, tmp_path)
    assert metrics["step"] == 36
    records = [json.loads(line) for line in (tmp_path / "spike_guard.jsonl").read_text().splitlines()]
    assert [(r["step"], r["action"]) for r in records] == [(30, "skip"), (31, "skip"), (32, "rollback")]
    skips = json.loads((tmp_path / "data_skips.json").read_text())
    batch = 8  # TINY: micro-batch 8, one rank, no accumulation
    assert skips["skips"] == [[30 * batch, 3 * batch]]  # the windows of steps 30, 31 and 32
    assert skips["rollbacks"][0]["checkpoint"] == "step0000030.ckpt"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "rolled_back" / "1").glob("*.ckpt"))[0] == "last.ckpt"
    from framework.checkpointing.checkpoints import safe_load

    state = safe_load(tmp_path / "checkpoints" / "last.ckpt")
    dm_state = next(v for k, v in state.items() if "DataModule" in k)
    assert dm_state["skips"] == [[240, 24]] and dm_state["global_samples_consumed"] == 36 * batch
