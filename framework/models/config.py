"""Model configuration: one dataclass for all three families, named presets, exact parameter counts.

Follows LitGPT's ``Config.from_name(name, **overrides)`` pattern: derived fields are filled in
``__post_init__`` so a preset plus overrides is always a complete, consistent shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from framework.catalogue import POSITIONS, family_spec


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig:
    """Shape of a transformer.

    ``family`` picks the architecture: ``decoder`` (GPT/Llama-style, causal), ``encoder``
    (BERT-style, bidirectional) or ``encoder_decoder`` (T5 v1.1-style).
    ``vocab_size`` 0 means "take it from the tokenizer"; the embedding is padded up to
    ``pad_vocab_multiple`` rows (padding rows are never produced by the tokenizer).
    """

    name: str = "custom"
    family: str = "decoder"
    vocab_size: int = 0
    pad_vocab_multiple: int = 64
    d_model: int = 256
    n_layers: int = 4  # decoder-only / encoder-only layers; encoder layers for encoder_decoder
    n_decoder_layers: int = 0  # encoder_decoder only; 0 means "same as n_layers"
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means "same as n_heads" (multi-head); fewer gives grouped-query attention
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 0  # SwiGLU hidden size; 0 means round_up(8/3 * d_model, ffn_multiple)
    ffn_multiple: int = 64
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    # T5-style relative position bias (encoder_decoder; the encoder family may use it too)
    position: str = "rope"  # "rope" | "relative_bias"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        traits = family_spec(self.family)  # raises for an unknown family
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                    "change one of them or set model.head_dim explicitly."
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}."
            )
        if self.d_ff == 0:
            self.d_ff = _round_up(int(8 * self.d_model / 3), self.ffn_multiple)
        if traits.has_decoder_stack and self.n_decoder_layers == 0:
            self.n_decoder_layers = self.n_layers
        if self.position not in POSITIONS:
            raise ValueError(f"model.position={self.position!r} must be one of {', '.join(POSITIONS)}.")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}.")

    # ------------------------------------------------------------------ helpers
    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size <= 0:
            raise ValueError("model.vocab_size is unset; it is filled in from the tokenizer before the model is built.")
        return _round_up(self.vocab_size, self.pad_vocab_multiple)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied and derived fields recomputed where they were derived."""
        base = dataclasses.asdict(self)
        base.update(changes)
        return ModelConfig(**base)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.")
        kwargs = dict(PRESETS[name])
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(name=name, **kwargs)

    def num_parameters(self) -> int:
        """Exact number of trainable parameters of the model this config builds (padded vocab)."""
        return count_parameters(self)


# Named shapes. Decoder sizes follow GPT-2 small/medium/large/XL widths and depths (with a SwiGLU MLP
# of hidden 8/3 d, so the counts differ slightly from GPT-2's 4d GELU MLP).
PRESETS: dict[str, dict[str, Any]] = {
    # tiny shapes for tests and CPU runs (torchtitan's debug model is dim 256, 6 layers)
    "tiny": dict(family="decoder", d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "small-cpu": dict(family="decoder", d_model=192, n_layers=4, n_heads=6, max_seq_len=512),  # README quickstart
    "gpt2-small": dict(family="decoder", d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "gpt2-medium": dict(family="decoder", d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    "gpt2-large": dict(family="decoder", d_model=1280, n_layers=36, n_heads=20, max_seq_len=1024),
    "gpt-1.3b": dict(family="decoder", d_model=2048, n_layers=24, n_heads=16, max_seq_len=2048),
    # encoders (masked LM): BERT-base/large widths and depths (Devlin et al. 2019, table 1) in the EuroBERT
    # layout (RMSNorm, rotary positions, SwiGLU of hidden 8/3 d), so counts differ from BERT's 110M/340M
    "bert-tiny": dict(family="encoder", d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "bert-small-cpu": dict(family="encoder", d_model=192, n_layers=4, n_heads=6, max_seq_len=512),
    "bert-base": dict(family="encoder", d_model=768, n_layers=12, n_heads=12, max_seq_len=512),
    "bert-large": dict(family="encoder", d_model=1024, n_layers=24, n_heads=16, max_seq_len=512),
    # encoder-decoders (span corruption): T5 v1.1 shapes (google/t5-v1_1-* configs: d_model, d_ff, d_kv,
    # heads, layers per stack), relative position bias with 32 buckets up to distance 128, untied LM head
    "t5-tiny": dict(family="encoder_decoder", d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=512,
                    position="relative_bias", norm_eps=1e-6, tie_embeddings=False),
    "t5-small-cpu": dict(family="encoder_decoder", d_model=192, n_layers=3, n_heads=6, d_ff=512, max_seq_len=512,
                         position="relative_bias", norm_eps=1e-6, tie_embeddings=False),
    "t5-small": dict(family="encoder_decoder", d_model=512, n_layers=8, n_heads=6, head_dim=64, d_ff=1024,
                     max_seq_len=512, position="relative_bias", norm_eps=1e-6, tie_embeddings=False),
    "t5-base": dict(family="encoder_decoder", d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=2048,
                    max_seq_len=512, position="relative_bias", norm_eps=1e-6, tie_embeddings=False),
    "t5-large": dict(family="encoder_decoder", d_model=1024, n_layers=24, n_heads=16, head_dim=64, d_ff=2816,
                     max_seq_len=512, position="relative_bias", norm_eps=1e-6, tie_embeddings=False),
}


def count_parameters(cfg: ModelConfig) -> int:
    """Closed-form parameter count per family; tests check it against ``sum(p.numel())``."""
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
    v = cfg.padded_vocab_size
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d  # wq, wk, wv, wo
    mlp = 3 * d * ff  # SwiGLU: gate, up, down
    norms = 2 * d  # pre-attention and pre-MLP RMSNorm weights
    embed = v * d
    head = 0 if cfg.tie_embeddings else v * d
    layer = attn + mlp + norms
    traits = family_spec(cfg.family)
    position_bias = cfg.relative_attention_num_buckets * cfg.n_heads if traits.relative_position_bias else 0
    stacks = embed + cfg.n_layers * layer + position_bias + d + head  # (encoder) stack + its final norm
    if traits.has_decoder_stack:  # decoder layers: self + cross attention, three norms; its own bias and final norm
        stacks += cfg.n_decoder_layers * (2 * attn + mlp + 3 * d) + position_bias + d
    return stacks
