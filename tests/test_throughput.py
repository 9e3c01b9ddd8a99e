"""FLOPs per training step, MFU and compute accounting of framework.callbacks.throughput."""

from __future__ import annotations

import csv
from dataclasses import replace
import math

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from framework.callbacks.throughput import PF_DAY_FLOPS, ThroughputMonitor, measure_training_flops, mfu, pf_days
from framework.data.tokenizer import SpecialIds
from framework.models import ModelConfig
from framework.objectives import objective_class
from framework.data.objective_batches import batch_collator, window_length
from framework.objectives.base import module_kwargs
from framework.objectives.config import ObjectiveConfig, OptimConfig

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, unk=3, mask=4, sentinels=tuple(range(5, 105)))
VOCAB = 512


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waiting on a shared 2-core machine (~50x slower there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_module(objective: str = "clm", preset: str = "tiny", seq_len: int = 32, **overrides):
    cfg = ModelConfig.from_name(preset, vocab_size=VOCAB, **overrides)
    return objective_class(objective)(**module_kwargs(cfg, OptimConfig(warmup_steps=1), ObjectiveConfig(), SPECIAL,
                                                      10))


def make_batch(module, batch_size: int, seq_len: int, seed: int = 0):
    objective = replace(module.objective_config, name=module.objective_name)
    window = window_length(objective, seq_len)
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(105, VOCAB, (batch_size, window), generator=g)
    collate = batch_collator(objective, seq_len, SPECIAL, VOCAB)
    return collate(windows) if collate is not None else windows


def attention_layer_flops(cfg: ModelConfig, q_tokens: int, kv_tokens: int) -> int:
    """Forward matmul FLOPs of one attention layer on one sequence (2 FLOPs per multiply-add): the q and o
    projections on the queries, k and v on the keys, and the full q_tokens x kv_tokens scores and weighted sum
    (FlopCounterMode does not halve causal attention)."""
    d, hd = cfg.d_model, cfg.head_dim
    proj = 2 * q_tokens * d * cfg.n_heads * hd * 2 + 2 * kv_tokens * d * cfg.n_kv_heads * hd * 2
    return proj + 2 * 2 * q_tokens * kv_tokens * cfg.n_heads * hd


def hand_training_flops(cfg: ModelConfig, B: int, T: int, target_len: int = 0, head_rows: int | None = None) -> int:
    """Forward + backward matmul FLOPs of one micro-batch, by hand; backward = 2 x forward (a gradient for each
    matmul's input and one for its weight). ``head_rows``: positions the LM head runs on (default: all)."""
    mlp = lambda tokens: 2 * tokens * 3 * cfg.d_model * cfg.d_ff  # noqa: E731  SwiGLU: gate, up, down
    if cfg.family == "encoder_decoder":
        S = T
        forward = B * cfg.n_layers * (attention_layer_flops(cfg, S, S) + mlp(S))
        forward += B * cfg.n_decoder_layers * (attention_layer_flops(cfg, target_len, target_len)
                                               + attention_layer_flops(cfg, target_len, S) + mlp(target_len))
        rows = B * target_len
    else:
        forward = B * cfg.n_layers * (attention_layer_flops(cfg, T, T) + mlp(T))
        rows = B * T
    forward += 2 * (rows if head_rows is None else head_rows) * cfg.d_model * cfg.padded_vocab_size
    return 3 * forward


FAMILIES = [("clm", "tiny", {}), ("clm", "tiny", {"n_kv_heads": 2, "tie_embeddings": False}),
            ("mlm", "bert-tiny", {}), ("span_corruption", "t5-tiny", {})]


@pytest.mark.parametrize("objective,preset,overrides", FAMILIES)
def test_step_flops_equal_hand_formula(objective, preset, overrides):
    """FlopCounterMode counts matmuls only, so the hand count of matmuls must match exactly (tolerance 0)."""
    module = make_module(objective, preset, **overrides)
    B, T = 4, 32
    batch = make_batch(module, B, T)
    measured = measure_training_flops(module, batch)
    cfg = module.model_config
    if objective == "clm":
        expected = hand_training_flops(cfg, B, T)
    elif objective == "mlm":  # the head runs on the selected positions only
        expected = hand_training_flops(cfg, B, T, head_rows=int((batch["labels"] != -100).sum()))
    else:
        assert batch["input_ids"].shape[1] == T
        expected = hand_training_flops(cfg, B, T, target_len=batch["labels"].shape[1])
    assert measured == expected


@pytest.mark.parametrize("objective,preset,overrides", FAMILIES)
def test_meta_measurement_equals_counter_on_the_real_step(objective, preset, overrides):
    """The meta-device count equals FlopCounterMode around the real CPU step (math attention, so SDPA is visible)."""
    module = make_module(objective, preset, **overrides)
    batch = make_batch(module, 4, 32)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss, _ = module.compute_loss(batch)
        loss.backward()
    assert measure_training_flops(module, batch) == counter.get_total_flops()


def test_step_flops_equal_the_planners_formula():
    """framework.scaling.flops (the planner's per-layer formula) equals the measurement for every family; the
    masked LM's head runs on the batch's selected positions only (head_rows)."""
    from framework.scaling import flops
    for objective, preset, overrides in FAMILIES:
        module = make_module(objective, preset, **overrides)
        batch = make_batch(module, 4, 32)
        target = batch["labels"].shape[1] if objective == "span_corruption" else None
        head_rows = int((batch["labels"] != -100).sum()) if objective == "mlm" else None
        formula = flops.training_flops_per_step(module.model_config, 4, 32, target, head_rows=head_rows)
        assert measure_training_flops(module, batch) == formula


def test_mfu_and_pf_days_by_hand():
    # 4.8e14 FLOPs per step in 2 s on 4 devices of 312e12 peak: 2.4e14 / 1.248e15
    assert mfu(4.8e14, 2.0, 312e12, 4) == pytest.approx(2.4e14 / 1.248e15, rel=1e-12)
    assert mfu(4.8e14, 2.0, 312e12, 4) == pytest.approx(0.19230769, rel=1e-7)
    assert pf_days(8.64e19) == pytest.approx(1.0)
    assert PF_DAY_FLOPS == 1e15 * 24 * 3600


class FakeClock:
    """Advances a fixed number of seconds each time it is read."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def test_callback_logs_mfu_for_known_step_time_and_peak(tmp_path):
    B, T, steps, tick, peak = 4, 32, 6, 0.25, 1e12
    module = make_module("clm")
    windows = [torch.randint(105, VOCAB, (T + 1,)) for _ in range(B * steps)]
    loader = DataLoader(windows, batch_size=B)
    monitor = ThroughputMonitor(window=3, peak_flops_per_device=peak, clock=FakeClock(tick))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[monitor], log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    flops = hand_training_flops(module.model_config, B, T)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    last = [r for r in rows if r.get("throughput/mfu")][-1]
    # each micro-batch takes one tick of the fake clock
    assert float(last["throughput/mfu"]) == pytest.approx(mfu(flops, tick, peak, 1), rel=1e-6)
    assert float(last["throughput/tokens_per_sec"]) == pytest.approx(B * T / tick, rel=1e-6)
    assert float(last["throughput/samples_per_sec"]) == pytest.approx(B / tick, rel=1e-6)
    assert float(last["compute/flops"]) == pytest.approx(steps * flops, rel=1e-6)
    assert float(last["compute/pf_days"]) == pytest.approx(steps * flops / 8.64e19, rel=1e-6)
    assert monitor.cumulative_flops == steps * flops
    assert monitor.state_dict()["cumulative_flops"] == steps * flops


def test_peak_lookup_and_no_invented_peak():
    from framework.callbacks.throughput import resolve_peak_flops

    assert resolve_peak_flops(None, "32-true")[0] is None  # CPU: no invented peak
    assert resolve_peak_flops(None, "32-true", override=5e12)[0] == 5e12
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert resolve_peak_flops("H100", "32-true")[0] == 66.9e12
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on tensor cores: the TF32 peak bounds them
        assert resolve_peak_flops("H100", "32-true")[0] == 494.7e12
    finally:
        torch.set_float32_matmul_precision(previous)
    assert resolve_peak_flops("A100", "bf16-mixed")[0] == 312e12
    assert math.isclose(resolve_peak_flops("V100", "16-mixed")[0], 125e12)
    assert resolve_peak_flops("V100", "bf16-mixed")[0] is None  # V100 has no bf16: not reported
