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
from torch import nn

from framework.models.config import ModelConfig
from framework.models.layers import Block, RMSNorm, init_weights, padding_keep_mask, rope_cos_sin


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "encoder":
            raise ValueError(f"Encoder needs an encoder-family config, got family={config.family!r}.")
        if config.position != "rope":
            raise ValueError("encoder models use rotary positions; set model.position=rope "
                             "(relative position bias is for the encoder_decoder family).")
        self.config = c = config
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

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T); attention_mask: (B, T), 1 = token, 0 = padding -> final-normed hidden (B, T, d)."""
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.config.max_seq_len}; "
                             "raise model.max_seq_len or lower data.seq_len.")
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        keep = padding_keep_mask(attention_mask)  # (B, 1, 1, T) or None
        x = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x, rope=rope, is_causal=False, attn_bias=keep)
        return self.norm_final(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                predict_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, padded_vocab).

        With ``predict_mask`` (B, T) bool, only the N selected positions go through the LM head and the
        logits are (N, padded_vocab), in row-major order: masked LM needs ~15% of them. The selection
        happens inside ``forward`` so that FSDP's and DDP's forward hooks wrap the whole computation."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, d)
        if predict_mask is not None:
            hidden = hidden[predict_mask]  # (N, d)
        return self.lm_head(hidden)
