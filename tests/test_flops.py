"""Exact per-layer FLOPs (framework.scaling.flops) against torch's FlopCounterMode on real forward+backward
passes of all three families, and against a hand count."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from framework.models import ModelConfig, build_model
from framework.scaling.flops import forward_flops, training_flops_per_step, training_flops_per_token


def _counted(model, inputs: tuple) -> tuple[int, int]:
    """(forward, backward) FLOPs counted by FlopCounterMode. The math SDPA backend runs attention as matmuls
    the counter sees (the CPU flash kernel is not in its table)."""
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with forward:
            out = model(*inputs)
        with backward:
            out.float().sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


CASES = [
    ("decoder", dict(d_model=64, n_layers=2, n_heads=4), 2, 32, None),
    ("decoder", dict(d_model=96, n_layers=1, n_heads=6, n_kv_heads=2, tie_embeddings=False, d_ff=160), 3, 24, None),
    ("encoder", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1), 2, 40, None),
    ("encoder_decoder", dict(d_model=64, n_layers=1, n_decoder_layers=2, n_heads=4, head_dim=32, d_ff=128,
                             position="relative_bias", tie_embeddings=False), 2, 40, 12),
]


@pytest.mark.parametrize("family,shape,batch,seq_len,target_len", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_formula_equals_flop_counter(family, shape, batch, seq_len, target_len):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=300, max_seq_len=64, **shape)
    model = build_model(cfg)
    ids = torch.randint(0, 300, (batch, seq_len))
    inputs = (ids,) if target_len is None else (ids, torch.randint(0, 300, (batch, target_len)))
    forward, backward = _counted(model, inputs)
    assert forward == forward_flops(cfg, batch, seq_len, target_len).forward
    assert forward + backward == training_flops_per_step(cfg, batch, seq_len, target_len)  # backward = 2 x forward


def test_hand_count_of_a_tiny_decoder():
    # d=64, 4 heads of 16, 2 KV heads, d_ff = round_up(8/3 * 64, 64) = 192, vocab 500 -> padded 512; B=2, T=32
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=500, max_seq_len=64)
    f = forward_flops(cfg, 2, 32)
    bt = 2 * 32
    assert f.attention_projections == 2 * (2 * bt * 64 * 64 + 2 * 2 * bt * 64 * 32 + 2 * bt * 64 * 64)
    assert f.attention_scores == 2 * 2 * (2 * 2 * 4 * 32 * 32 * 16)  # layers x (QK^T + AV)
    assert f.mlp == 2 * 3 * 2 * bt * 64 * 192
    assert f.lm_head == 2 * bt * 64 * 512
    assert f.forward == 16_777_216 + 1_048_576  # matmuls of the linears (measured) + attention
    assert f.training == 3 * f.forward
    # the masked LM's head on 10 selected rows only
    assert forward_flops(cfg.replace(family="encoder"), 2, 32, head_rows=10).lm_head == 2 * 10 * 64 * 512


def test_six_n_is_close_for_a_large_decoder_and_inputs_are_checked():
    # GPT-3 2.7B-like shape at 2048 tokens: exact / 6N per token = 1 + (attention + head) terms, within 20 %
    cfg = ModelConfig(d_model=2560, n_layers=32, n_heads=32, vocab_size=50257, max_seq_len=2048)
    ratio = training_flops_per_token(cfg, 2048) / (6 * cfg.num_parameters())
    # Kaplan et al. 2020 Table 1: C_forward = 2 N_matmul + 2 n_layer n_ctx d_attn per token, whose attention term
    # is QK^T only; with the AV product as well it is 4 n_layer n_ctx d. With tied embeddings the matmul weights
    # are every parameter but the RMSNorm gains (the embedding matrix is used once, as the head).
    n_matmul = cfg.num_parameters() - (2 * 32 + 1) * 2560
    kaplan_plus_av = 3 * (2 * n_matmul + 4 * 32 * 2048 * 2560) / (6 * cfg.num_parameters())
    assert 1.0 < ratio < 1.2
    assert ratio == pytest.approx(kaplan_plus_av, rel=1e-12)
    with pytest.raises(ValueError, match="target_len"):
        forward_flops(cfg.replace(family="encoder_decoder", position="relative_bias"), 1, 16)
