"""Decoder model: causality, exact parameter count, RMSNorm and rotary properties, KV-cache equivalence."""

import math

import pytest
import torch

from framework.models import ModelConfig, build_model
from framework.models.layers import RMSNorm, apply_rope, rope_cos_sin


def _decoder(**kw):
    cfg = ModelConfig(**{**dict(d_model=32, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=64), **kw})
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


@pytest.mark.parametrize("t", [0, 5, 11])
def test_causality_changing_token_t_leaves_earlier_logits_unchanged(t):
    model, cfg = _decoder()
    x = torch.randint(0, 100, (2, 12))
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 100
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :t], b[:, :t])  # bit-identical before t
    assert not torch.allclose(a[:, t:], b[:, t:])  # and the change is visible from t on


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=False),
    dict(n_kv_heads=2),
    dict(d_model=48, n_heads=3, d_ff=100, n_layers=3),
    dict(vocab_size=1000, pad_vocab_multiple=128),
])
def test_parameter_count_equals_formula(kw):
    model, cfg = _decoder(**kw)
    actual = sum(p.numel() for p in model.parameters())  # tied weights counted once by parameters()
    d, L, V, ff = cfg.d_model, cfg.n_layers, cfg.padded_vocab_size, cfg.d_ff
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ff + 2 * d
    expected = V * d + L * per_layer + d + (0 if cfg.tie_embeddings else V * d)
    assert actual == expected == cfg.num_parameters()


def test_gpt2_small_like_preset_size():
    cfg = ModelConfig.from_name("gpt2-small", vocab_size=50257)
    # 12 layers of d=768 with a SwiGLU MLP (hidden 2048) and tied 50304-row embedding: 123.6M parameters
    assert cfg.num_parameters() == 50304 * 768 + 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768


def test_rmsnorm_matches_definition():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)


def test_rope_dot_product_depends_only_on_relative_offset():
    hd = 16
    cos, sin = rope_cos_sin(32, hd, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, hd), cos[i : i + 1], sin[i : i + 1]).flatten()
        kj = apply_rope(k.view(1, 1, 1, hd), cos[j : j + 1], sin[j : j + 1]).flatten()
        return float(qi @ kj)

    assert math.isclose(score(3, 1), score(12, 10), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(score(7, 7), float(q @ k), rel_tol=1e-4, abs_tol=1e-5)  # zero offset: no rotation


def test_kv_cache_decoding_equals_full_forward():
    model, _ = _decoder(n_kv_heads=2)
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache()
        steps = [model(x[:, :4], kv_cache=cache)] + [model(x[:, i : i + 1], kv_cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_max_seq_len_is_refused():
    model, _ = _decoder(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_shapes_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_name("gpt5")
