"""Decoder-only (GPT / Llama-style) language model as a plain ``nn.Module``.

Token embedding -> L pre-norm blocks with causal self-attention (rotary positions) and a SwiGLU MLP
-> final RMSNorm -> LM head (optionally tied to the embedding). Knows nothing of Lightning,
strategies or precision; those are applied from outside (``framework.distributed``).
"""

from __future__ import annotations

import torch
from torch import nn

from framework.models.config import ModelConfig
from framework.models.layers import Block, KVCache, RMSNorm, init_weights, rope_cos_sin


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "decoder":
            raise ValueError(f"Decoder needs a decoder-family config, got family={config.family!r}.")
        self.config = config
        c = config
        self.embed = nn.Embedding(c.padded_vocab_size, c.d_model)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.norm_eps, c.dropout) for _ in range(c.n_layers)
        )
        self.norm_final = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cos_sin(c.max_seq_len, c.head_dim, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config.init_std, self.config.n_layers)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
        cos, sin = rope_cos_sin(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta,
                                device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, padded_vocab). With ``kv_cache``, positions continue after it."""
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.seq_len
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds model.max_seq_len={self.config.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len."
            )
        rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.embed(input_ids)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, is_causal=True, kv_cache=kv_cache, layer_idx=i)
        return self.lm_head(self.norm_final(x))  # (B, T, V)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)
