"""Count what autograd saves for backward: the measurement behind ``framework.scaling.memory``'s activation terms.

One forward inside ``torch.autograd.graph.saved_tensors_hooks``: every distinct storage a backward node saves is
summed once, parameters and buffers excluded (they are model states, allocated whatever the batch), and split
into autocast's 16-bit copies of the weights (a saved matrix whose autograd history is a cast of a parameter,
possibly transposed or viewed), float32 tensors and the rest (16-bit activations, int64 ids). Eager only:
``torch.compile``'s partitioner recomputes cheap pointwise ops and saves less.

On a CPU, attention without a bias runs the flash kernel, which saves what CUDA's flash kernel saves (q, k,
v, output, float32 logsumexp); with an additive bias that needs a gradient (T5) it falls back to the math
kernel, which keeps the (B, heads, T, S) probabilities. ``efficient_attention_on_cpu`` swaps in, for that
case only, a function that saves what CUDA's memory-efficient kernel saves, so a CPU count matches a GPU's.

``retained_tensor_bytes`` measures differently, from the allocator's side: every storage an operator creates
during the forward that is still alive once it returns. It sees what saved-tensor hooks cannot, such as the
block inputs non-reentrant activation checkpointing holds for recomputation.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_COPY_OR_VIEW = ("ToCopyBackward", "TBackward", "ViewBackward", "PermuteBackward", "TransposeBackward")


def is_weight_copy(t: torch.Tensor) -> bool:
    """Whether ``t`` is a parameter cast (autocast's 16-bit copy), possibly transposed or viewed: its autograd
    history is copies and views ending at a leaf parameter's AccumulateGrad."""
    node = t.grad_fn
    for _ in range(4):
        if node is None or not type(node).__name__.startswith(_COPY_OR_VIEW):
            return False
        node = next((n for n, _ in node.next_functions if n is not None), None)
        if node is not None and type(node).__name__ == "AccumulateGrad":
            return True
    return False


def saved_tensor_bytes(forward: Callable[[], Any], module: nn.Module, device_type: str = "cpu",
                       autocast_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs (under autocast to
    ``autocast_dtype`` when given): keys weight_copies, fp32, other, activations (= fp32 + other)."""
    states = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    saved: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in states:
            kind = "weight_copies" if is_weight_copy(t) else ("fp32" if t.dtype == torch.float32 else "other")
            saved[storage.data_ptr()] = (kind, storage.nbytes())
        return t

    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = forward()
    del out
    totals = {"weight_copies": 0, "fp32": 0, "other": 0}
    for kind, nbytes in saved.values():
        totals[kind] += nbytes
    totals["activations"] = totals["fp32"] + totals["other"]
    return totals


class _StorageTracker(TorchDispatchMode):
    """Weak references to the storage of every operator output (keyed by address: a dead storage's address
    may be reused by a later one, which then replaces it)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int, torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes(), t.dtype)
        return out


def retained_tensor_bytes(forward: Callable[[], torch.Tensor], module: nn.Module, device_type: str = "cpu",
                          autocast_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of the storages created during ``forward()`` (a loss) that are alive after it returns, keeping
    the loss's graph: keys fp32, int64 (token ids, indices), other (16-bit activations, masks, weight copies);
    parameters, buffers and the loss itself excluded."""
    states = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with _StorageTracker() as tracker, autocast:
        loss = forward()
    gc.collect()
    states.add(loss.untyped_storage().data_ptr())
    totals = {"fp32": 0, "int64": 0, "other": 0}
    for ptr, (ref, nbytes, dtype) in tracker.storages.items():
        if ptr not in states and not ref.expired():
            totals["fp32" if dtype == torch.float32 else "int64" if dtype == torch.int64 else "other"] += nbytes
    del loss
    return totals


class EfficientAttentionStandIn(torch.autograd.Function):
    """Attention with an additive bias, saving what CUDA's memory-efficient kernel saves
    (``ScaledDotProductEfficientAttentionBackward``: query, key, value, attn_bias, output, logsumexp): the CPU
    has no fused kernel for a bias that needs a gradient and falls back to the math kernel, which keeps the
    (B, heads, T, S) probabilities instead."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale + bias.float()  # (B, nh, T, S)
        lse = torch.logsumexp(scores, dim=-1)  # (B, nh, T) float32
        out = (torch.softmax(scores, -1) @ v.float()).to(q.dtype)  # (B, nh, T, hd)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel's (B, T, nh, hd) layout
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (q, k, v, bias)]
            scores = (inputs[0] @ inputs[1].transpose(-2, -1)) * ctx.scale + inputs[3]
            out = torch.softmax(scores.float(), -1).to(q.dtype) @ inputs[2]
            grads = torch.autograd.grad(out, inputs, grad)
        return (*grads, None)


@contextlib.contextmanager
def efficient_attention_on_cpu() -> Iterator[None]:
    """Within: ``F.scaled_dot_product_attention`` with a float bias on the CPU saves what CUDA's efficient
    kernel saves (``EfficientAttentionStandIn``); everything else goes to the real function."""
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        fused_on_cpu = attn_mask is None or attn_mask.dtype == torch.bool
        if fused_on_cpu or q.device.type != "cpu" or is_causal or dropout_p:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if torch.is_autocast_enabled("cpu"):  # autocast casts every floating input of SDPA, the bias included
            dtype = torch.get_autocast_dtype("cpu")
            q, k, v, attn_mask = (x.to(dtype) for x in (q, k, v, attn_mask))
        with torch.autocast("cpu", enabled=False):
            return EfficientAttentionStandIn.apply(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
