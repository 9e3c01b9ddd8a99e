"""Encoder-decoder (T5 v1.1-style) model as a plain ``nn.Module``.

Raffel et al. 2020 ("Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"),
with the v1.1 changes (gated activation, no parameter sharing between embedding and classifier):

- one token embedding shared by encoder and decoder inputs;
- encoder: L pre-norm blocks (RMSNorm, bidirectional self-attention, SwiGLU MLP) -> final RMSNorm;
- decoder: L' pre-norm blocks of causal self-attention, cross-attention to the encoder output and a
  SwiGLU MLP -> final RMSNorm -> LM head;
- positions: a learned bucketed relative position bias (``RelativePositionBias``), one per stack,
  computed once and shared by every layer of that stack (T5 keeps it in the first layer); the
  decoder's cross-attention has no position bias;
- attention logits are *not* scaled by 1/sqrt(head_dim) (T5 folds that into the initialisation);
- untied LM head by default (v1.1); with ``tie_embeddings`` the decoder output is multiplied by
  d_model^-0.5 before the tied head, as Mesh TensorFlow and transformers' T5 do.

It maps one-to-one onto transformers' ``T5ForConditionalGeneration`` with
``feed_forward_proj="gated-silu"`` (``framework.export``). The decoder input is the target sequence
shifted right, starting with ``<pad>`` (T5's ``decoder_start_token_id``).
"""

from __future__ import annotations

import torch
from torch import nn

from framework.models.config import ModelConfig
from framework.models.document_mask import document_keep_mask
from framework.models.layers import (
    Attention, Block, KVCache, RelativePositionBias, RMSNorm, SwiGLU, init_weights, padding_keep_mask,
)

T5_SCALE = 1.0  # softmax(q k^T + bias): no 1/sqrt(head_dim)


class CrossAttentionBlock(nn.Module):
    """T5 decoder layer: x + self_attn(norm(x)), x + cross_attn(norm(x), encoder), x + mlp(norm(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.dropout)
        self.norm_cross = RMSNorm(c.d_model, c.norm_eps)
        self.cross_attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.dropout)
        self.norm_mlp = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.d_ff)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, *, self_bias: torch.Tensor, encoder_hidden: torch.Tensor,
                encoder_keep: torch.Tensor | None, kv_cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_attn(x), is_causal=True, attn_bias=self_bias, kv_cache=kv_cache,
                                    layer_idx=layer_idx, scale=T5_SCALE))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), kv_input=encoder_hidden, attn_bias=encoder_keep,
                                          scale=T5_SCALE))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from framework.models.registry import check_config  # the registry imports this module

        check_config(self, config)
        self.config = c = config
        self.embed = nn.Embedding(c.padded_vocab_size, c.d_model)
        buckets, distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        self.encoder_position_bias = RelativePositionBias(c.n_heads, buckets, distance, bidirectional=True)
        self.encoder_blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.norm_eps, c.dropout) for _ in range(c.n_layers)
        )
        self.encoder_norm = RMSNorm(c.d_model, c.norm_eps)
        self.decoder_position_bias = RelativePositionBias(c.n_heads, buckets, distance, bidirectional=False)
        self.decoder_blocks = nn.ModuleList(CrossAttentionBlock(c) for _ in range(c.n_decoder_layers))
        self.decoder_norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.drop = nn.Dropout(c.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2-style N(0, init_std) as the other families (not Mesh TF's fan-in init); output projections
        # scaled by 1/sqrt(2 * total depth)
        init_weights(self, self.config.init_std, self.config.n_layers + self.config.n_decoder_layers)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, S); attention_mask: (B, S), 1 = token, 0 = padding -> encoder output (B, S, d).
        With ``document_ids`` (B, S), encoder self-attention is block-diagonal over the packed documents (the
        relative position bias needs no restart: it depends only on distances inside a document)."""
        S = input_ids.shape[1]
        x = self.drop(self.embed(input_ids))  # (B, S, d)
        bias = self.encoder_position_bias(S, S).to(x.dtype)  # (1, nh, S, S), shared by every layer
        keep = padding_keep_mask(attention_mask)
        if document_ids is not None:
            same = document_keep_mask(document_ids)  # (B, 1, S, S)
            keep = same if keep is None else keep & same
        if keep is not None:
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)  # (B, nh, S, S)
        for block in self.encoder_blocks:
            x = block(x, attn_bias=bias, scale=T5_SCALE)
        return self.drop(self.encoder_norm(x))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """decoder_input_ids: (B, T); encoder_hidden: (B, S, d); attention_mask: the encoder's (B, S) padding mask.

        With ``kv_cache`` (from ``new_kv_cache``) the decoder continues after the cached positions; the
        cross-attention keys/values are recomputed from ``encoder_hidden`` each call. Returns (B, T, V)."""
        T = decoder_input_ids.shape[1]
        past = 0 if kv_cache is None else kv_cache.seq_len
        x = self.drop(self.embed(decoder_input_ids))  # (B, T, d)
        self_bias = self.decoder_position_bias(T, past + T, query_offset=past).to(x.dtype)  # (1, nh, T, past+T)
        encoder_keep = padding_keep_mask(attention_mask)  # (B, 1, 1, S) or None
        for i, block in enumerate(self.decoder_blocks):
            x = block(x, self_bias=self_bias, encoder_hidden=encoder_hidden, encoder_keep=encoder_keep,
                      kv_cache=kv_cache, layer_idx=i)
        x = self.drop(self.decoder_norm(x))
        if self.config.tie_embeddings:
            x = x * self.config.d_model ** -0.5  # Mesh TF / T5 rescaling before a tied output embedding
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, S); decoder_input_ids: (B, T) -> logits (B, T, padded_vocab)."""
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask, document_ids), attention_mask)

    def new_kv_cache(self) -> KVCache:
        """An empty cache for the decoder's self-attention (one entry per decoder layer)."""
        return KVCache(self.config.n_decoder_layers)
