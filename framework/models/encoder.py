"""Encoder-only (BERT-style) masked language model as a plain ``nn.Module``.

Devlin et al. 2019 ("BERT") trained with the masked-LM objective; the architecture here is the modern
pre-norm variant that EuroBERT (Boizard et al. 2025) uses: token embedding -> L pre-norm blocks with
*bidirectional* self-attention (rotary positions, Su et al. 2021) and a SwiGLU MLP -> final RMSNorm ->
LM head over the vocabulary (optionally tied to the embedding). It is the decoder's ``Block`` without the
causal mask, so it maps one-to-one onto transformers' ``EuroBertForMaskedLM`` (``framework.export``).
Unlike the original BERT there are no learned absolute positions, no biases, no LayerNorm/GELU and no
dense+norm transform before the LM head.
"""

from __future__ import annotations

import torch

from framework.models.config import ModelConfig
from framework.models.document_mask import document_keep_mask
from framework.models.layers import RotaryStack, padding_keep_mask


class Encoder(RotaryStack):
    def __init__(self, config: ModelConfig) -> None:
        from framework.models.registry import check_config  # the registry imports this module

        check_config(self, config)
        super().__init__(config)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T); attention_mask: (B, T), 1 = token, 0 = padding -> final-normed hidden (B, T, d).
        With ``document_ids`` (B, T), attention is block-diagonal over the packed documents."""
        T = input_ids.shape[1]
        self._check_length(T)
        keep = padding_keep_mask(attention_mask)  # (B, 1, 1, T) or None
        if document_ids is not None:
            rope, attention = self.document_attention(document_ids, causal=False)
            if keep is not None:  # padding as well: the boolean path
                attention = {"attn_bias": keep & document_keep_mask(document_ids), "is_causal": False}
        else:
            rope, attention = (self.rope_cos[:T], self.rope_sin[:T]), {"is_causal": False, "attn_bias": keep}
        x = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x, rope=rope, **attention)
        return self.norm_final(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                predict_mask: torch.Tensor | None = None, predict_index: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, padded_vocab).

        With ``predict_mask`` (B, T) bool, only the N selected positions go through the LM head and the
        logits are (N, padded_vocab), in row-major order: masked LM needs ~15% of them. The selection
        happens inside ``forward`` so that FSDP's and DDP's forward hooks wrap the whole computation.
        ``predict_index`` (N,) long, the same positions as flat row-major indices, gives the same logits without
        a host-device synchronisation (a boolean mask's N is known only after the GPU has counted it)."""
        hidden = self.hidden_states(input_ids, attention_mask, document_ids)  # (B, T, d)
        if predict_index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, predict_index)  # (N, d)
        elif predict_mask is not None:
            hidden = hidden[predict_mask]  # (N, d)
        return self.lm_head(hidden)
