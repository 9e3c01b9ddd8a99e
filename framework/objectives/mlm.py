"""Masked language modelling (Devlin et al. 2019, "BERT", sec. 3.1) on an encoder-only model.

Windows of ``seq_len`` raw tokens are masked by ``MLMCollator`` (80% <mask> / 10% random / 10% kept,
optionally whole words); the loss is the cross-entropy on the selected positions only. Only the selected
positions go through the LM head (B*T*p rows instead of B*T), which saves most of the vocabulary matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.data.collators import IGNORE_INDEX, MLMCollator, word_boundary_tables
from framework.objectives.base import PretrainModule
from framework.objectives.config import ObjectiveConfig


class MaskedLM(PretrainModule):
    family = "encoder"
    objective_name = "mlm"

    @classmethod
    def window_length(cls, seq_len: int, objective: ObjectiveConfig) -> int:
        return seq_len  # masking keeps the length: inputs and labels are both (B, seq_len)

    def collator(self, document_mask: bool = False) -> MLMCollator:
        o, ids = self.objective_config, self.special_ids
        word_tables = None
        if o.whole_word_masking:
            if not self.tokenizer_path:
                raise ValueError("objective.whole_word_masking needs the run's tokenizer, but no tokenizer_path was "
                                 "given to the module; build it through framework.train.build_run.")
            from framework.data.tokenizer import load_tokenizer

            word_tables = word_boundary_tables(load_tokenizer(self.tokenizer_path), ids.all)
        return MLMCollator(vocab_size=self.model_config.vocab_size, mask_id=ids.mask, special_ids=ids.all,
                           mask_probability=o.mask_probability, mask_token_fraction=o.mask_token_fraction,
                           random_token_fraction=o.random_token_fraction, word_tables=word_tables,
                           document_eos_id=ids.eos if document_mask else None)

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
