"""Memory model: ZeRO's worked example, the bytes-per-parameter breakdowns, how strategies shard, and the
activation formula: by hand, and against the tensors autograd saves for all three families."""

from __future__ import annotations

import pytest

from framework.catalogue import STRATEGIES
from framework.models import ModelConfig
from framework.scaling.memory import (GB, PRECISION_STATE_BYTES, activation_bytes, activation_terms,
                                      estimate_memory, korthikanti_activation_bytes, model_state_bytes,
                                      weight_copy_bytes)


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


def test_korthikanti_reference_by_hand():
    # Korthikanti et al. 2022 eq. 1 with fused attention: 34 s b h per 16-bit layer, plus 4 s b V fp32 logits
    cfg = ModelConfig(d_model=1024, n_layers=24, n_heads=16, vocab_size=50000, max_seq_len=2048)
    s, b, h, v, L = 2048, 4, 1024, cfg.padded_vocab_size, 24
    assert korthikanti_activation_bytes(cfg, b, s) == L * 34 * s * b * h + 4 * s * b * v
    assert korthikanti_activation_bytes(cfg, b, s, bytes_per_element=4) == 2 * L * 34 * s * b * h + 4 * s * b * v


def test_activation_formula_by_hand():
    """The per-layer constants of the module docstring, written out for a decoder (q = h)."""
    cfg = ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, vocab_size=50000, max_seq_len=2048)
    s, b, h, f, a, v, L = 2048, 4, 1024, 2816, 16, cfg.padded_vocab_size, 24
    n = s * b
    ids, logits = 16 * n, 4 * n * v
    # bf16 autocast: two norms (fp32 input + fp32 normalised + rsqrt), 3 + 2 + 1 separate 16-bit casts of the
    # norms' outputs, q, k, v, out in 16-bit, fp32 logsumexp, four d_ff-wide 16-bit SwiGLU tensors
    bf16_layer = 2 * (8 * n * h + 4 * n) + 6 * n * h + 8 * n * h + 4 * a * n + 4 * n * h + 8 * n * f
    bf16_head = 8 * n * h + 4 * n + 2 * n * h + logits + ids
    assert bf16_layer == 34 * n * h + 8 * n * f + 8 * n + 4 * a * n  # 34 + 8 f / h = 56 s b h at f = 2.75 h
    assert activation_bytes(cfg, b, s, "bf16") == L * bf16_layer + bf16_head
    fp32_terms = activation_terms(cfg, b, s, "bf16")
    assert sum(t.bytes for t in fp32_terms if t.float32) == L * (16 * n * h + 8 * n + 4 * a * n) + 8 * n * h + 4 * n + logits
    # fp32: every linear's input is the one shared norm output, everything 4 bytes
    fp32_layer = 2 * (8 * n * h + 4 * n) + 4 * n * h + 16 * n * h + 4 * a * n + 4 * n * h + 16 * n * f
    assert activation_bytes(cfg, b, s, "fp32") == L * fp32_layer + 8 * n * h + 4 * n + 4 * n * h + logits + ids
    # pure bf16: the norms save a float32 copy of their 16-bit input and a 16-bit normalised x
    pure_layer = 2 * (6 * n * h + 4 * n) + 2 * n * h + 8 * n * h + 4 * a * n + 2 * n * h + 8 * n * f
    pure = L * pure_layer + 6 * n * h + 4 * n + 2 * n * h + logits + ids
    assert activation_bytes(cfg, b, s, "bf16_true") == pure
    # DeepSpeed and FSDP2 run 16-bit weights: mixed precision saves what pure bf16 saves, and nothing is cast
    assert activation_bytes(cfg, b, s, "bf16", strategy="deepspeed_zero2") == pure
    assert weight_copy_bytes(cfg, "bf16", "fsdp") == 0 and weight_copy_bytes(cfg, "bf16_true") == 0
    assert weight_copy_bytes(cfg, "bf16") == 2 * (L * (4 * h * h + 3 * h * f) + v * h)
    # full checkpointing: each block's float32 input + one block recomputed + the head
    assert activation_bytes(cfg, b, s, "bf16", checkpointing=True) == L * 4 * n * h + bf16_layer + bf16_head
    # the math kernel keeps Korthikanti's 5 a s^2 b score bytes per layer
    assert activation_bytes(cfg, b, s, "bf16", fused_attention=False) == L * (bf16_layer + 5 * a * s * s * b) + bf16_head
    # masked LM: only the selected rows reach the head (their 16-bit cast, log-softmax, labels and indices)
    enc = ModelConfig(family="encoder", d_model=1024, n_layers=24, n_heads=16, d_ff=2816, vocab_size=50000,
                      max_seq_len=2048)
    rows = 0.15 * s
    mlm_head = 8 * n * h + 4 * n + 2 * b * rows * h + 4 * b * rows * v + 8 * n + 8 * b * rows + n
    assert activation_bytes(enc, b, s, "bf16", head_rows=rows) == pytest.approx(L * bf16_layer + mlm_head)


def test_strategies_shard_as_documented():
    cfg = ModelConfig(d_model=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096)
    n = cfg.num_parameters()
    kw = dict(n_gpus=16, micro_batch=1, seq_len=4096, gpus_per_node=8)
    by_name = {name: estimate_memory(cfg, n, name, "bf16", **kw) for name in STRATEGIES}
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


# ------------------------------------------------------------------ activation formula vs what autograd saves
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from framework.data.tokenizer import SpecialIds  # noqa: E402
from framework.objectives import OBJECTIVES  # noqa: E402
from framework.data.objective_batches import batch_collator, window_length  # noqa: E402
from framework.objectives.base import module_kwargs  # noqa: E402
from framework.objectives.config import ObjectiveConfig, OptimConfig  # noqa: E402
from framework.scaling.saved_tensors import (efficient_attention_on_cpu, retained_tensor_bytes,  # noqa: E402
                                             saved_tensor_bytes)

SPECIAL = SpecialIds(0, 1, 2, 3, 4, tuple(range(5, 105)))
# tiny but not trivial: grouped-query heads (decoder), q = n_heads x head_dim != d_model (T5), d_ff != 8h/3
SHAPES = {
    "clm": dict(family="decoder", d_model=96, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=160, max_seq_len=256),
    "mlm": dict(family="encoder", d_model=96, n_layers=2, n_heads=6, d_ff=160, max_seq_len=256),
    "span_corruption": dict(family="encoder_decoder", d_model=96, n_layers=2, n_decoder_layers=2, n_heads=4,
                            head_dim=32, d_ff=160, max_seq_len=256, position="relative_bias",
                            relative_attention_num_buckets=32, relative_attention_max_distance=128),
}


def _module_and_batch(objective: str, precision: str, batch_size: int, seq_len: int, checkpointing: bool = False):
    """The objective's module on a tiny ``SHAPES`` model (bf16_true: cast to bf16), one collated batch, and the
    shape arguments of ``activation_terms`` (T5's target length; masked LM's selected rows per sequence)."""
    from framework.distributed.parallelize import apply_activation_checkpointing, blocks

    cfg = ModelConfig(**SHAPES[objective], vocab_size=1000)
    cls, obj = OBJECTIVES[objective], ObjectiveConfig(name=objective)
    torch.manual_seed(0)
    module = cls(**module_kwargs(cfg, OptimConfig(), obj, SPECIAL, 10))
    if precision == "bf16_true":
        module = module.to(torch.bfloat16)
    if checkpointing:  # what framework.distributed.parallelize applies with strategy.activation_checkpointing
        for block in blocks(module.model):
            apply_activation_checkpointing(block)
    window = torch.randint(105, 1000, (batch_size, window_length(obj, seq_len)))
    collate = batch_collator(obj, seq_len, SPECIAL, cfg.vocab_size)
    batch = collate(window) if collate else window
    shape = {"target_len": int(batch["labels"].shape[1]) if objective == "span_corruption" else None}
    if objective == "mlm":
        shape["head_rows"] = int((batch["labels"] != -100).sum()) / batch_size
    return module, batch, cfg, shape


@pytest.mark.parametrize("precision", ["bf16", "fp32", "bf16_true"])
@pytest.mark.parametrize("objective", ["clm", "mlm", "span_corruption"])
def test_activation_formula_matches_saved_tensors(objective, precision):
    """The planner's activation terms against the distinct storages autograd saves in one eager forward of the
    objective's loss on the CPU, for all three families and precisions, within 1% (the formula rounds
    nothing; what is left is int64 bookkeeping such as a view vs a copy of the targets). Float32 and 16-bit
    shares are checked separately, and autocast's weight copies exactly."""
    b, s = 2, 64
    module, batch, cfg, shape = _module_and_batch(objective, precision, b, s)
    with efficient_attention_on_cpu():  # T5's biased attention saves what CUDA's efficient kernel saves
        saved = saved_tensor_bytes(lambda: module.compute_loss(batch)[0], module, "cpu",
                                   torch.bfloat16 if precision == "bf16" else None)
    terms = activation_terms(cfg, b, s, precision, **shape)
    predicted = sum(t.bytes for t in terms)
    predicted_fp32 = sum(t.bytes for t in terms if t.float32)
    assert saved["activations"] == pytest.approx(predicted, rel=1e-3)
    assert saved["fp32"] == pytest.approx(predicted_fp32, rel=1e-3)
    assert saved["weight_copies"] == weight_copy_bytes(cfg, precision)


def test_efficient_attention_stand_in_matches_sdpa():
    """The stand-in the measurement uses for T5's biased attention computes what SDPA computes, gradients too."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, requires_grad=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    grads_expected = torch.autograd.grad(expected.square().sum(), (q, k, v, bias))
    with efficient_attention_on_cpu():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    assert out.grad_fn.name() == "EfficientAttentionStandInBackward"
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (q, k, v, bias)), grads_expected):
        torch.testing.assert_close(got, want)
    assert F.scaled_dot_product_attention(q, k, v, attn_mask=bias).grad_fn.name() != out.grad_fn.name()  # restored


@pytest.mark.parametrize("precision", ["bf16", "fp32", "bf16_true"])
@pytest.mark.parametrize("objective", ["clm", "mlm", "span_corruption"])
def test_checkpointed_activations_match_retained_storages(objective, precision):
    """With the framework's per-block activation checkpointing, what stays allocated after the forward (every
    storage an operator created that is still alive: saved-tensor hooks do not see what checkpointing holds)
    is the formula's checkpointed terms without the block being recomputed: each block's input, the stacks'
    shared tensors and the loss head. Under autocast the LM head's 16-bit weight copy is saved too (the
    blocks' copies die with autocast's cache at the end of the forward and are recast on recomputation)."""
    module, batch, cfg, shape = _module_and_batch(objective, precision, 2, 64, checkpointing=True)
    with efficient_attention_on_cpu():
        kept = retained_tensor_bytes(lambda: module.compute_loss(batch)[0], module, "cpu",
                                     torch.bfloat16 if precision == "bf16" else None)
    terms = [t for t in activation_terms(cfg, 2, 64, precision, checkpointing=True, **shape)
             if not t.name.startswith("recomputed block") and "int64" not in t.name]
    head_copy = 2 * cfg.padded_vocab_size * cfg.d_model if precision == "bf16" else 0
    # to the byte but the cross-entropy's 4-byte total weight
    assert kept["fp32"] == pytest.approx(sum(t.bytes for t in terms if t.float32), abs=8)
    assert kept["other"] - head_copy == pytest.approx(sum(t.bytes for t in terms if not t.float32), abs=8)
    full = activation_terms(cfg, 2, 64, precision, **shape)
    assert sum(t.bytes for t in terms) < 0.5 * sum(t.bytes for t in full)  # checkpointing keeps much less
