"""Causal language modelling: predict token t+1 from tokens <= t (Radford et al. 2018/2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.objectives.base import PretrainModule
from framework.objectives.config import ObjectiveConfig


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy in nats. logits: (B, T, V); targets: (B, T) already shifted, -100 = ignore."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


class CausalLM(PretrainModule):
    family = "decoder"
    objective_name = "clm"

    @classmethod
    def window_length(cls, seq_len: int, objective: ObjectiveConfig) -> int:
        return seq_len + 1  # inputs are tokens [0, T), targets are tokens [1, T]

    def compute_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        logits = self.model(inputs)  # (B, T, V)
        # the count by a fill kernel: torch.tensor(n, device=cuda) would be a blocking host-to-device copy
        return next_token_loss(logits, targets), torch.full((), targets.numel(), device=batch.device)

    def batch_tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)
