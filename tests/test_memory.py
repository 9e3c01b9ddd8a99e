"""Memory model: ZeRO's worked example, the bytes-per-parameter breakdowns, Korthikanti et al.'s activation
formula by hand, and how strategies shard."""

from __future__ import annotations

import pytest

from framework.models import ModelConfig
from framework.scaling.memory import (GB, PRECISION_STATE_BYTES, STRATEGY_SPECS, activation_bytes, estimate_memory,
                                      model_state_bytes)


def test_zero_paper_worked_example():
    # Rajbhandari et al. 2020, Figure 1 / sec. 5: 7.5B parameters, N_d = 64, mixed-precision Adam (K = 12)
    psi, nd, state = 7.5e9, 64, PRECISION_STATE_BYTES["bf16"]
    per_gpu = [sum(model_state_bytes(psi, stage, nd, state).values()) / GB for stage in (0, 1, 2, 3)]
    assert [round(x, 1) for x in per_gpu] == [120.0, 31.4, 16.6, 1.9]
    assert per_gpu[1] == pytest.approx(4 * 7.5 + 12 * 7.5 / 64)  # 2 Psi + 2 Psi + K Psi / N_d
    assert per_gpu[2] == pytest.approx(2 * 7.5 + 14 * 7.5 / 64)  # 2 Psi + (2 + K) Psi / N_d
    assert per_gpu[3] == pytest.approx(16 * 7.5 / 64)  # (2 + 2 + K) Psi / N_d


def test_bytes_per_parameter():
    fp32, mixed, pure = (PRECISION_STATE_BYTES[k] for k in ("fp32", "bf16", "bf16_true"))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4, 4, 8)  # fp32 weights, grads, Adam m and v
    assert (mixed.weights, mixed.gradients, mixed.optimizer) == (2, 2, 12)  # ZeRO's 16 bytes/param
    assert fp32.total == mixed.total == 16 and pure.total == 8
    assert PRECISION_STATE_BYTES["fp16"] == mixed


def test_activation_formula_by_hand():
    # Korthikanti et al. 2022 eq. 1: s b h (34 + 5 a s / h) bytes per layer in 16-bit, plus 4 s b V fp32 logits
    cfg = ModelConfig(d_model=1024, n_layers=24, n_heads=16, vocab_size=50000, max_seq_len=2048)
    s, b, h, a, v, L = 2048, 4, 1024, 16, cfg.padded_vocab_size, 24
    bf16, fp32 = PRECISION_STATE_BYTES["bf16"], PRECISION_STATE_BYTES["fp32"]
    logits = 4 * s * b * v
    full = activation_bytes(cfg, b, s, bf16, fused_attention=False)
    assert full == L * s * b * h * (34 + 5 * a * s / h) + logits
    # fused attention (FlashAttention / SDPA) never stores the a s^2 scores: 34 s b h per layer
    assert activation_bytes(cfg, b, s, bf16) == L * 34 * s * b * h + logits
    # full checkpointing keeps each layer's 16-bit input plus one layer being recomputed
    assert activation_bytes(cfg, b, s, bf16, checkpointing=True) == L * 2 * s * b * h + 34 * s * b * h + logits
    # fp32 activations take twice the bytes
    assert activation_bytes(cfg, b, s, fp32) == 2 * L * 34 * s * b * h + logits


def test_strategies_shard_as_documented():
    cfg = ModelConfig(d_model=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096)
    n = cfg.num_parameters()
    kw = dict(n_gpus=16, micro_batch=1, seq_len=4096, gpus_per_node=8)
    by_name = {name: estimate_memory(cfg, n, name, "bf16", **kw) for name in STRATEGY_SPECS}
    assert by_name["ddp"].model_states == pytest.approx(16 * n)
    assert by_name["fsdp"].model_states == pytest.approx(by_name["deepspeed_zero3"].model_states)
    assert by_name["fsdp"].model_states == pytest.approx(16 * n / 16)
    assert by_name["fsdp_shard_grad_op"].model_states == pytest.approx(2 * n + 14 * n / 16)
    assert by_name["fsdp_hybrid"].model_states == pytest.approx(16 * n / 8)  # sharded within a node of 8
    # ZeRO-Offload: only the 16-bit weights (and a gradient partition) stay on the GPU; Adam lives on the host
    off = by_name["deepspeed_zero2_offload"]
    assert off.optimizer == 0 and off.weights == pytest.approx(2 * n) and off.cpu == pytest.approx(16 * n / 16)
    assert by_name["deepspeed_zero3_offload"].weights == 0
    # ordering by memory: replicated > stage 1 > stage 2 > stage 3
    totals = [by_name[k].total for k in ("ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")]
    assert totals == sorted(totals, reverse=True)
    # one GPU: nothing to shard, every strategy holds the full states
    one = estimate_memory(cfg, n, "deepspeed_zero3", "bf16", n_gpus=1, micro_batch=1, seq_len=4096)
    assert one.model_states == pytest.approx(16 * n)
    # a 7B model with mixed-precision Adam does not fit one 80 GB GPU with DDP, but does with ZeRO-3 on 16
    assert not by_name["ddp"].fits(80 * GB) and by_name["deepspeed_zero3"].fits(80 * GB)
    with pytest.raises(ValueError, match="unknown strategy"):
        estimate_memory(cfg, n, "zero9", "bf16", **kw)
