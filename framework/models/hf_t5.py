"""Hugging Face export of the encoder_decoder family: ``T5ForConditionalGeneration`` (T5 v1.1: gated-silu MLP,
relative position bias in the first layer of each stack)."""

from __future__ import annotations

from typing import Any

from framework.models.config import ModelConfig


def _attention(prefix: str, ours: str) -> dict[str, str]:
    return {f"{prefix}.{hf}.weight": f"{ours}.{w}.weight" for hf, w in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo"))}


def _mlp(prefix: str, ours: str) -> dict[str, str]:
    return {f"{prefix}.DenseReluDense.wi_0.weight": f"{ours}.w_gate.weight",
            f"{prefix}.DenseReluDense.wi_1.weight": f"{ours}.w_up.weight",
            f"{prefix}.DenseReluDense.wo.weight": f"{ours}.w_down.weight"}


def weight_names(c: ModelConfig) -> dict[str, str]:
    """transformers name -> our state-dict name (no ``model.`` prefix)."""
    names = {
        "shared.weight": "embed.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder_position_bias.embedding.weight",
        "encoder.final_layer_norm.weight": "encoder_norm.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder_position_bias.embedding.weight",
        "decoder.final_layer_norm.weight": "decoder_norm.weight",
    }
    for i in range(c.n_layers):
        hf, ours = f"encoder.block.{i}.layer", f"encoder_blocks.{i}"
        names.update(_attention(f"{hf}.0.SelfAttention", f"{ours}.attn"))
        names[f"{hf}.0.layer_norm.weight"] = f"{ours}.norm_attn.weight"
        names.update(_mlp(f"{hf}.1", f"{ours}.mlp"))
        names[f"{hf}.1.layer_norm.weight"] = f"{ours}.norm_mlp.weight"
    for i in range(c.n_decoder_layers):
        hf, ours = f"decoder.block.{i}.layer", f"decoder_blocks.{i}"
        names.update(_attention(f"{hf}.0.SelfAttention", f"{ours}.attn"))
        names[f"{hf}.0.layer_norm.weight"] = f"{ours}.norm_attn.weight"
        names.update(_attention(f"{hf}.1.EncDecAttention", f"{ours}.cross_attn"))
        names[f"{hf}.1.layer_norm.weight"] = f"{ours}.norm_cross.weight"
        names.update(_mlp(f"{hf}.2", f"{ours}.mlp"))
        names[f"{hf}.2.layer_norm.weight"] = f"{ours}.norm_mlp.weight"
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def config(c: ModelConfig, special: Any):
    from transformers import T5Config

    if c.n_kv_heads != c.n_heads:
        raise ValueError(f"T5 has no grouped-query attention, so a model with n_kv_heads={c.n_kv_heads} != "
                         f"n_heads={c.n_heads} cannot be exported to T5ForConditionalGeneration.")
    return T5Config(d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_layers=c.n_layers,
                    num_decoder_layers=c.n_decoder_layers, num_heads=c.n_heads,
                    relative_attention_num_buckets=c.relative_attention_num_buckets,
                    relative_attention_max_distance=c.relative_attention_max_distance,
                    dropout_rate=c.dropout, layer_norm_epsilon=c.norm_eps, feed_forward_proj="gated-silu",
                    is_encoder_decoder=True, decoder_start_token_id=special.pad, vocab_size=c.padded_vocab_size,
                    pad_token_id=special.pad, eos_token_id=special.eos, tie_word_embeddings=c.tie_embeddings)


def generation(special: Any) -> dict:
    """generation_config.json fields beyond pad and eos: the decoder starts from <pad>, as T5's does."""
    return {"decoder_start_token_id": special.pad}
