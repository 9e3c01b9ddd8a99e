"""Encoder and encoder-decoder models: exact parameter counts, attention structure, T5 relative positions,
incremental decoding, family checks in the objectives."""

from __future__ import annotations

import math

import pytest
import torch

from framework.models import PRESETS, Encoder, EncoderDecoder, ModelConfig, build_model
from framework.models.layers import RelativePositionBias
from framework.objectives import CausalLM, MaskedLM, SpanCorruption
from framework.data.objective_batches import batch_collator, target_length, window_length
from framework.objectives.base import module_kwargs
from framework.objectives.config import ObjectiveConfig, OptimConfig
from framework.data.tokenizer import SpecialIds

V = 300  # padded to 320


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that positions and masks visibly change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


@pytest.mark.parametrize("preset,overrides", [
    ("bert-tiny", {}),
    ("bert-tiny", dict(n_kv_heads=2, tie_embeddings=False, d_ff=96)),
    ("bert-small-cpu", dict(head_dim=48)),
    ("t5-tiny", {}),
    ("t5-tiny", dict(n_decoder_layers=3, n_kv_heads=1, tie_embeddings=True, relative_attention_num_buckets=16)),
    ("t5-small-cpu", dict(n_layers=2, head_dim=16)),
])
def test_parameter_count_is_exact(preset, overrides):
    config = ModelConfig.from_name(preset, vocab_size=V, **overrides)
    model = build_model(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_t5_presets_have_t5_v1_1_sizes():
    # transformers' google/t5-v1_1-small has 76,961,152 parameters with its 32,128-row vocabulary
    assert ModelConfig.from_name("t5-small", vocab_size=32128).num_parameters() == 76_961_152
    for name, preset in PRESETS.items():
        config = ModelConfig.from_name(name, vocab_size=32000)
        assert config.num_parameters() > 0
        if preset["family"] == "encoder_decoder":
            assert config.position == "relative_bias" and not config.tie_embeddings


def test_encoder_is_bidirectional_and_respects_padding():
    config = ModelConfig.from_name("bert-tiny", vocab_size=V)
    model = Encoder(config).eval()
    _randomize(model)
    x = torch.randint(5, V, (2, 12))
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(changed)
        # a later token changes every earlier position's logits (no causal mask)
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3
        # padding positions do not affect real ones, whatever their content
        mask = torch.ones_like(x)
        mask[:, 8:] = 0
        noisy = x.clone()
        noisy[:, 8:] = torch.randint(5, V, (2, 4))
        torch.testing.assert_close(model(x, mask)[:, :8], model(noisy, mask)[:, :8])
        torch.testing.assert_close(model(x, mask)[:, :8], model(x[:, :8]))


def test_relative_position_buckets_by_hand_and_against_transformers():
    bucket = RelativePositionBias.bucket
    rel = torch.tensor([0, -1, 1, -7, -8, -16, -127, -128, -1000, 1000, 12])
    # bidirectional, 32 buckets: 16 per direction, exact below 8, then 8 + floor(log(d/8) / log(16) * 8), max 15;
    # d = 16 -> 8 + 2 = 10; d = 12 -> 8 + floor(1.17) = 9; positive offsets add 16
    assert bucket(rel, True, 32, 128).tolist() == [0, 1, 17, 7, 8, 10, 15, 15, 15, 31, 25]
    # causal: only d = -rel >= 0 counts, exact below 16, then 16 + floor(log(d/16) / log(8) * 16), max 31
    assert bucket(rel, False, 32, 128).tolist() == [0, 1, 0, 7, 8, 16, 31, 31, 31, 0, 0]
    from transformers.models.t5.modeling_t5 import T5Attention

    positions = torch.arange(-300, 301)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 64), (8, 20)):
            expected = T5Attention._relative_position_bucket(positions, bidirectional, buckets, distance)
            assert torch.equal(bucket(positions, bidirectional, buckets, distance), expected)


def test_encoder_decoder_causality_padding_and_kv_cache():
    config = ModelConfig.from_name("t5-tiny", vocab_size=V, n_decoder_layers=3)
    model = EncoderDecoder(config).eval()
    _randomize(model, seed=1)
    src = torch.randint(5, V, (2, 10))
    tgt = torch.randint(5, V, (2, 7))
    with torch.no_grad():
        full = model(src, tgt)
        assert full.shape == (2, 7, config.padded_vocab_size)
        # the decoder is causal: changing target token 4 leaves positions 0..3 unchanged, changes 4
        changed = tgt.clone()
        changed[:, 4] = (tgt[:, 4] + 1) % V
        other = model(src, changed)
        torch.testing.assert_close(other[:, :4], full[:, :4])
        assert (other[:, 4] - full[:, 4]).abs().max() > 1e-3
        # every decoder position sees the whole source
        src2 = src.clone()
        src2[:, -1] = (src[:, -1] + 1) % V
        assert (model(src2, tgt)[:, 0] - full[:, 0]).abs().max() > 1e-3
        # source padding is invisible
        mask = torch.ones_like(src)
        mask[1, 6:] = 0
        noisy = src.clone()
        noisy[1, 6:] = torch.randint(5, V, (4,))
        torch.testing.assert_close(model(src, tgt, mask), model(noisy, tgt, mask))
        torch.testing.assert_close(model(src, tgt, mask)[1], model(src[1:, :6], tgt[1:])[0])
        # incremental decoding with the self-attention cache equals the full pass
        memory = model.encode(src)
        cache = model.new_kv_cache()
        steps = [model.decode(tgt[:, :3], memory, kv_cache=cache)]
        for t in range(3, 7):
            steps.append(model.decode(tgt[:, t : t + 1], memory, kv_cache=cache))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_tied_t5_rescales_decoder_output():
    untied = ModelConfig.from_name("t5-tiny", vocab_size=V)
    tied = untied.replace(tie_embeddings=True)
    a, b = EncoderDecoder(untied).eval(), EncoderDecoder(tied).eval()
    _randomize(a)
    state = {k: v for k, v in a.state_dict().items() if k != "lm_head.weight"}
    b.load_state_dict(state, strict=False)
    with torch.no_grad():
        a.lm_head.weight.copy_(a.embed.weight)
        src, tgt = torch.randint(5, V, (1, 6)), torch.randint(5, V, (1, 4))
        # tied head: logits are those of the same head applied to d_model^-0.5 times the decoder output
        torch.testing.assert_close(b(src, tgt), a(src, tgt) * untied.d_model ** -0.5)


def _kwargs(config: ModelConfig) -> dict:
    special = SpecialIds(pad=0, bos=1, eos=2, unk=3, mask=4, sentinels=tuple(range(5, 105)))
    return module_kwargs(config, OptimConfig(), ObjectiveConfig(), special, max_steps=10)


def test_objectives_refuse_a_model_of_another_family():
    decoder = ModelConfig.from_name("tiny", vocab_size=V)
    encoder = ModelConfig.from_name("bert-tiny", vocab_size=V)
    t5 = ModelConfig.from_name("t5-tiny", vocab_size=V)
    with pytest.raises(ValueError, match="objective=mlm trains 'encoder' models.*'tiny' is of family 'decoder'"):
        MaskedLM(**_kwargs(decoder))
    with pytest.raises(ValueError, match="objective=span_corruption trains 'encoder_decoder' models"):
        SpanCorruption(**_kwargs(encoder))
    with pytest.raises(ValueError, match="objective=clm trains 'decoder' models"):
        CausalLM(**_kwargs(t5))
    assert isinstance(MaskedLM(**_kwargs(encoder)).model, Encoder)
    assert isinstance(SpanCorruption(**_kwargs(t5)).model, EncoderDecoder)


def test_module_loads_older_hparams_and_forgets_the_data_settings():
    """Checkpoints written before the data side owned them carry seq_len and tokenizer_path: accepted, not kept."""
    old = {**_kwargs(ModelConfig.from_name("tiny", vocab_size=V)), "seq_len": 64, "tokenizer_path": "/x/tok.json"}
    module = CausalLM(**old)
    assert "seq_len" not in module.hparams and "tokenizer_path" not in module.hparams
    assert not hasattr(module, "seq_len") and module.hparams["max_steps"] == 10
    with pytest.raises(TypeError, match="unexpected arguments \\['window'\\]"):
        CausalLM(**_kwargs(ModelConfig.from_name("tiny", vocab_size=V)), window=3)


def test_model_position_settings_are_checked():
    with pytest.raises(ValueError, match="relative_bias"):
        EncoderDecoder(ModelConfig.from_name("t5-tiny", vocab_size=V, position="rope"))
    with pytest.raises(ValueError, match="position=rope"):
        Encoder(ModelConfig.from_name("bert-tiny", vocab_size=V, position="relative_bias"))


def test_objective_losses_equal_cross_entropy_on_the_right_positions():
    import torch.nn.functional as F

    torch.manual_seed(0)
    mlm = MaskedLM(**_kwargs(ModelConfig.from_name("bert-tiny", vocab_size=V)))
    windows = torch.randint(105, V, (4, 32))
    windows[:, ::9] = 2  # <eos> is never selected
    special = SpecialIds(**mlm.hparams["special_ids"])
    batch = batch_collator(ObjectiveConfig(name="mlm"), 32, special, V)(windows, generator=torch.Generator().manual_seed(1))
    selected = batch["labels"] != -100
    loss, count = mlm.compute_loss(batch)
    full = mlm.model(batch["input_ids"])  # (B, T, V)
    torch.testing.assert_close(mlm.model(batch["input_ids"], predict_mask=selected), full[selected])
    assert int(count) == int(selected.sum()) > 0
    torch.testing.assert_close(loss, F.cross_entropy(full[selected], windows[selected]))

    t5 = SpanCorruption(**_kwargs(ModelConfig.from_name("t5-tiny", vocab_size=V)))
    span = ObjectiveConfig(name="span_corruption")
    assert window_length(span, 64) == 70 and target_length(span, 64) == 14
    batch = batch_collator(span, 64, special, V)(torch.randint(105, V, (4, 70)))
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].shape == (4, 14)
    loss, count = t5.compute_loss(batch)
    logits = t5.model(batch["input_ids"], batch["decoder_input_ids"])
    assert int(count) == 4 * 14 and t5.batch_tokens(batch) == 4 * 64
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)))
