"""Causal language modelling: predict token t+1 from tokens <= t (Radford et al. 2018/2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.objectives.base import PretrainModule


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy in nats. logits: (B, T, V); targets: (B, T) already shifted, -100 = ignore."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


class CausalLM(PretrainModule):
    family = "decoder"
    objective_name = "clm"

    def compute_loss(self, batch: torch.Tensor | dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch``: (B, T + 1) windows, or {"tokens", "document_ids"} with document masking
        (``framework.data.objective_batches``)."""
        windows, documents = (batch["tokens"], batch["document_ids"]) if isinstance(batch, dict) else (batch, None)
        inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
        logits = self.model(inputs, document_ids=documents)  # (B, T, V)
        # the count by a fill kernel: torch.tensor(n, device=cuda) would be a blocking host-to-device copy
        return next_token_loss(logits, targets), torch.full((), targets.numel(), device=windows.device)

    def batch_tokens(self, batch: torch.Tensor | dict) -> int:
        windows = batch["tokens"] if isinstance(batch, dict) else batch
        return windows.shape[0] * (windows.shape[1] - 1)
