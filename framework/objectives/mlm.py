"""Masked language modelling (Devlin et al. 2019, "BERT", sec. 3.1) on an encoder-only model.

Windows of ``seq_len`` raw tokens are masked by ``MLMCollator`` (80% <mask> / 10% random / 10% kept, optionally
whole words; built by ``framework.data.objective_batches``); the loss is the cross-entropy on the selected positions only. Only the selected
positions go through the LM head (B*T*p rows instead of B*T), which saves most of the vocabulary matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.data.collators import IGNORE_INDEX
from framework.objectives.base import PretrainModule


class MaskedLM(PretrainModule):
    family = "encoder"
    objective_name = "mlm"

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]  # (B, T), IGNORE_INDEX where not selected
        index = batch.get("predict_index")  # (N,) flat positions; MLMCollator computes them on the host
        if index is None:  # a hand-built batch: derive them here (this waits for the device once)
            index = (labels.view(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        logits = self.model(batch["input_ids"], batch.get("attention_mask"), predict_index=index,
                            document_ids=batch.get("document_ids"))  # (N, V)
        n = index.numel()  # host metadata: no synchronisation
        loss = F.cross_entropy(logits.float(), labels.view(-1).index_select(0, index), reduction="sum") / max(1, n)
        return loss, torch.full((), n, device=labels.device, dtype=torch.long)

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()
