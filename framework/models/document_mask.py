"""Attention within documents of a packed window (``data.document_mask=true``).

Pretraining packs documents back to back into fixed windows. Without a mask a token attends to the end of the
previous, unrelated document; with one it attends only to tokens of its own document: block-causal for the
decoder, block-diagonal for the encoder and the T5 encoder (as torchtitan's, Megatron's and llm-foundry's
document masking; Zhao et al. 2024 "Analysing the Impact of Sequence Composition on Language Model
Pre-Training" measure the gain), and rotary positions restart at every document.

A window's documents are given as ``document_ids`` (B, T): a non-decreasing segment number per token. The
collators build it from the document starts of the prepared data; a window that begins inside a document
begins with that document's tail as segment 0.

Two implementations of the same mask: on CUDA, FlexAttention (``torch.nn.attention.flex_attention``, compiled,
which skips the fully masked blocks), elsewhere a boolean mask through ``scaled_dot_product_attention`` (exact,
but it materialises (B, 1, T, T) booleans and takes the math or memory-efficient kernel).
"""

from __future__ import annotations

import torch


def document_keep_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool, True where query and key lie in the same document."""
    return document_ids[:, None, :, None] == document_ids[:, None, None, :]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) long: each token's position inside its own document (0 at a document start)."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    return index - start_index


def flex_block_mask(document_ids: torch.Tensor, causal: bool):
    """A FlexAttention BlockMask for ``document_ids`` (B, T); CUDA only (the CPU path uses the boolean mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = document_ids.shape

    def same_document(b, h, q, k):
        keep = document_ids[b, q] == document_ids[b, k]
        return keep & (q >= k) if causal else keep

    return create_block_mask(same_document, B, None, T, T, device=document_ids.device)


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None = None):
    """The compiled FlexAttention kernel (compiled once per process)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as eager

        _compiled_flex = torch.compile(eager, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
