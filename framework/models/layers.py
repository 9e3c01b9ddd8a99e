"""Transformer building blocks shared by all three model families.

- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (computed in float32, as Llama).
- Rotary positions: Su et al. 2021, "RoFormer", in the half-split ("rotate_half") layout Llama uses,
  so a decoder exports to transformers' LlamaForCausalLM without permuting weights.
- SwiGLU MLP: Shazeer 2020, "GLU Variants Improve Transformer": down(silu(gate(x)) * up(x)).
- Attention through ``torch.nn.functional.scaled_dot_product_attention`` with optional grouped-query
  heads, an additive bias (T5 relative positions) and a key/value cache for generation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from framework.models.document_mask import document_keep_mask, document_positions, flex_attention, flex_block_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (seq_len, head_dim) in float32, half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos/sin: (T, hd), or (B, 1, T, hd) for per-document positions. Rotation done in
    float32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Per-layer key/value cache for incremental decoding: tensors of shape (B, n_kv_heads, T, hd)."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def seq_len(self) -> int:
        """Tokens cached so far (read before a forward pass; layers update one by one during it)."""
        return self.layer_len(0)

    def layer_len(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention. Self-attention when ``kv_input`` is None, else cross."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin for the query positions, (T, hd)
        is_causal: bool = False,
        attn_bias: torch.Tensor | None = None,  # additive, broadcastable to (B, nh, T, S); bool = keep-mask
        kv_input: torch.Tensor | None = None,  # (B, S, d) for cross-attention
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        scale: float | None = None,
        block_mask=None,  # a FlexAttention BlockMask (document masking on CUDA); replaces is_causal/attn_bias
    ) -> torch.Tensor:
        B, T, _ = x.shape
        src = x if kv_input is None else kv_input
        S = src.shape[1]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.wv(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.layer_len(layer_idx)
            k, v = kv_cache.update(layer_idx, k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if block_mask is not None:
            y = flex_attention(q, k, v, block_mask, scale)  # (B, nh, T, hd)
            return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        mask = attn_bias
        causal = is_causal
        if is_causal and past > 0:
            # incremental decoding: query i sits at absolute position past + i; build the mask explicitly
            q_pos = torch.arange(past, past + T, device=x.device)[:, None]
            k_pos = torch.arange(k.shape[2], device=x.device)[None, :]
            keep = k_pos <= q_pos  # (T, S_total)
            mask = keep if mask is None else _combine(mask, keep)
            causal = False
        elif is_causal and mask is not None:
            keep = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril()
            mask = _combine(mask, keep)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal, scale=scale
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(y)


def _combine(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Combine an attention mask (bool keep-mask or additive float bias) with a boolean keep-mask."""
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, norm_eps: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, head_dim, dropout)
        self.norm_mlp = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_attn(x), **attn_kwargs))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 style init: N(0, std) for linears and embeddings, output projections scaled by 1/sqrt(2L)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith("wo.weight") or name.endswith("w_down.weight"):
            nn.init.normal_(p, mean=0.0, std=std / (2 * n_layers) ** 0.5)
        else:
            nn.init.normal_(p, mean=0.0, std=std)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias (Raffel et al. 2020, sec. 2.1; Mesh TensorFlow's
    ``_relative_position_bucket``): one learned scalar per (bucket, head), added to the attention logits.

    Relative position r = key_position - query_position. Half of the buckets hold exact distances
    |r| < num_buckets / 4 (bidirectional) or / 2 (causal); the rest cover distances logarithmically up to
    ``max_distance``, beyond which all distances share the last bucket. Bidirectional attention spends
    half of the buckets on r > 0; causal attention maps every r > 0 to bucket 0 (those keys are masked).
    """

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    @staticmethod
    def bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
        """relative_position: integer tensor (any shape) -> bucket ids in [0, num_buckets), same shape."""
        buckets = torch.zeros_like(relative_position)
        if bidirectional:
            num_buckets //= 2
            buckets = buckets + (relative_position > 0).long() * num_buckets
            distance = relative_position.abs()
        else:
            distance = (-relative_position).clamp_min(0)
        max_exact = num_buckets // 2
        # log-spaced buckets for max_exact <= distance < max_distance (clamp_min only avoids log(0); those
        # positions take the exact branch below)
        log_ratio = torch.log(distance.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact)
        large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
        return buckets + torch.where(distance < max_exact, distance, large)

    def forward(self, query_len: int, key_len: int, query_offset: int = 0) -> torch.Tensor:
        """Bias of shape (1, n_heads, query_len, key_len); query i sits at position query_offset + i."""
        device = self.embedding.weight.device
        q_pos = torch.arange(query_offset, query_offset + query_len, device=device)[:, None]
        k_pos = torch.arange(key_len, device=device)[None, :]
        buckets = self.bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)  # (T, S)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, nh, T, S)


def padding_keep_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) with 1 = real token, 0 = padding -> boolean keep-mask (B, 1, 1, S) for Attention, or None."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class RotaryStack(nn.Module):
    """Embedding -> ``n_layers`` pre-norm rotary ``Block``s -> final RMSNorm -> LM head (optionally tied).

    The decoder (causal) and the encoder (bidirectional) are this stack with different attention masks;
    subclasses write ``forward``. Parameter names (``embed``, ``blocks.i.*``, ``norm_final``, ``lm_head``)
    are what checkpoints and ``framework.export`` rely on.
    """

    def __init__(self, config) -> None:
        super().__init__()
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

    def document_attention(self, document_ids: torch.Tensor, causal: bool) -> tuple[tuple, dict]:
        """Rotary tables and attention arguments for packed documents (``document_ids`` (B, T)): positions
        restart at each document; attention stays inside it (FlexAttention on CUDA, a boolean mask elsewhere)."""
        positions = document_positions(document_ids)  # (B, T)
        rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))  # (B, 1, T, hd)
        if document_ids.is_cuda:
            return rope, {"block_mask": flex_block_mask(document_ids, causal)}
        return rope, {"attn_bias": document_keep_mask(document_ids), "is_causal": causal}

    def _check_length(self, total: int) -> None:
        if total > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {total} tokens exceeds model.max_seq_len={self.config.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len."
            )
