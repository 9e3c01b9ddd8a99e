"""Decoder-only (GPT / Llama-style) language model as a plain ``nn.Module``.

Token embedding -> L pre-norm blocks with causal self-attention (rotary positions) and a SwiGLU MLP
-> final RMSNorm -> LM head (optionally tied to the embedding). Knows nothing of Lightning,
strategies or precision; those are applied from outside (``framework.distributed``).
"""

from __future__ import annotations

import torch

from framework.models.config import ModelConfig
from framework.models.layers import KVCache, RotaryStack


class Decoder(RotaryStack):
    def __init__(self, config: ModelConfig) -> None:
        if config.family != "decoder":
            raise ValueError(f"Decoder needs a decoder-family config, got family={config.family!r}.")
        super().__init__(config)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, padded_vocab). With ``kv_cache``, positions continue after it."""
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.seq_len
        self._check_length(start + T)
        rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.embed(input_ids)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, is_causal=True, kv_cache=kv_cache, layer_idx=i)
        return self.lm_head(self.norm_final(x))  # (B, T, V)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)
