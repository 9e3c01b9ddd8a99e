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
        from framework.models.registry import check_config  # the registry imports this module

        check_config(self, config)
        super().__init__(config)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, padded_vocab). With ``kv_cache``, positions continue after it.
        With ``document_ids`` (B, T) (packed documents, ``framework.models.document_mask``), attention is
        block-causal and positions restart at each document."""
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.seq_len
        self._check_length(start + T)
        if document_ids is not None:
            if kv_cache is not None:
                raise ValueError("document masking is for training on packed windows, not for cached decoding.")
            rope, attention = self.document_attention(document_ids, causal=True)
        else:
            rope, attention = (self.rope_cos[start : start + T], self.rope_sin[start : start + T]), {"is_causal": True}
        x = self.embed(input_ids)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, kv_cache=kv_cache, layer_idx=i, **attention)
        return self.lm_head(self.norm_final(x))  # (B, T, V)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)
