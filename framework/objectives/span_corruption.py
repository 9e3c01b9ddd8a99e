"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4) on an encoder-decoder model.

A raw window of ``window_length(seq_len)`` tokens (T5's ``random_spans_helper``: 568 for 512) is corrupted by
``SpanCorruptionCollator`` (both in ``framework.data.objective_batches``): 15% of it, in spans of mean length 3, is
replaced by sentinels in the encoder input and becomes the decoder's target, so inputs and targets come out at fixed lengths
(512 and 114 at the defaults) with no padding. The loss is the cross-entropy over every target token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.objectives.base import PretrainModule


class SpanCorruption(PretrainModule):
    family = "encoder_decoder"
    objective_name = "span_corruption"

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"], batch["decoder_input_ids"],
                            document_ids=batch.get("document_ids"))  # (B, T_target, V)
        labels = batch["labels"]  # (B, T_target); no padding, every position counts
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        # the count by a fill kernel: torch.tensor(n, device=cuda) would be a blocking host-to-device copy
        return loss, torch.full((), labels.numel(), device=labels.device)

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        # T5 counts pre-training tokens as encoder input tokens (sec. 3.1.2: 2^35 ~ 34B tokens = steps x 128 x 512)
        return batch["input_ids"].numel()
