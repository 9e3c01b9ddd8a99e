"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4) on an encoder-decoder model.

A raw window of ``window_length(seq_len)`` tokens (T5's ``random_spans_helper``: 568 for 512) is
corrupted by ``SpanCorruptionCollator``: 15% of it, in spans of mean length 3, is replaced by sentinels
in the encoder input and becomes the decoder's target, so inputs and targets come out at fixed lengths
(512 and 114 at the defaults) with no padding. The loss is the cross-entropy over every target token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.data.collators import SpanCorruptionCollator, random_spans_helper
from framework.objectives.base import PretrainModule
from framework.objectives.config import ObjectiveConfig


class SpanCorruption(PretrainModule):
    family = "encoder_decoder"
    objective_name = "span_corruption"

    @classmethod
    def window_length(cls, seq_len: int, objective: ObjectiveConfig) -> int:
        tokens_length, _ = random_spans_helper(seq_len, objective.noise_density, objective.mean_noise_span_length)
        return tokens_length

    @classmethod
    def target_length(cls, seq_len: int, objective: ObjectiveConfig) -> int:
        return random_spans_helper(seq_len, objective.noise_density, objective.mean_noise_span_length)[1]

    def collator(self, document_mask: bool = False) -> SpanCorruptionCollator:
        o, ids = self.objective_config, self.special_ids
        return SpanCorruptionCollator(
            tokens_length=self.window_length(self.seq_len, o), sentinels=ids.sentinels, eos_id=ids.eos,
            decoder_start_id=ids.pad, noise_density=o.noise_density, mean_noise_span_length=o.mean_noise_span_length,
            document_mask=document_mask)

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
