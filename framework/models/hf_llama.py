"""Hugging Face export of the rotary families: decoder -> ``LlamaForCausalLM``, encoder -> ``EuroBertForMaskedLM``.

Both are ``framework.models.layers.RotaryStack``: the same pre-norm blocks (RMSNorm, half-split RoPE, SwiGLU,
grouped-query heads), so one weight-name map serves both; only the config class differs.
"""

from __future__ import annotations

from typing import Any

from framework.models.config import ModelConfig


def _block_map(prefix: str, ours: str) -> dict[str, str]:
    """Llama/EuroBERT decoder-layer names for one of our pre-norm ``Block``s."""
    return {
        f"{prefix}.input_layernorm.weight": f"{ours}.norm_attn.weight",
        f"{prefix}.self_attn.q_proj.weight": f"{ours}.attn.wq.weight",
        f"{prefix}.self_attn.k_proj.weight": f"{ours}.attn.wk.weight",
        f"{prefix}.self_attn.v_proj.weight": f"{ours}.attn.wv.weight",
        f"{prefix}.self_attn.o_proj.weight": f"{ours}.attn.wo.weight",
        f"{prefix}.post_attention_layernorm.weight": f"{ours}.norm_mlp.weight",
        f"{prefix}.mlp.gate_proj.weight": f"{ours}.mlp.w_gate.weight",
        f"{prefix}.mlp.up_proj.weight": f"{ours}.mlp.w_up.weight",
        f"{prefix}.mlp.down_proj.weight": f"{ours}.mlp.w_down.weight",
    }


def weight_names(c: ModelConfig) -> dict[str, str]:
    """transformers name -> our state-dict name (no ``model.`` prefix)."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm_final.weight"}
    for i in range(c.n_layers):
        names.update(_block_map(f"model.layers.{i}", f"blocks.{i}"))
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _llama_like(c: ModelConfig, special: Any) -> dict:
    return dict(hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
                num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=c.init_std,
                bos_token_id=special.bos, vocab_size=c.padded_vocab_size, pad_token_id=special.pad,
                eos_token_id=special.eos, tie_word_embeddings=c.tie_embeddings)


def decoder_config(c: ModelConfig, special: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**_llama_like(c, special))


def encoder_config(c: ModelConfig, special: Any):
    from transformers import EuroBertConfig

    return EuroBertConfig(mask_token_id=special.mask, **_llama_like(c, special))


def decoder_generation(special: Any) -> dict:
    """generation_config.json fields beyond pad and eos: a causal LM starts from bos."""
    return {"bos_token_id": special.bos}


def encoder_generation(special: Any) -> dict:
    return {}
