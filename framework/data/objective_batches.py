"""How long a raw window is and how raw windows become a batch, for each objective: the data side's own reading
of ``objective.*`` (no Lightning, no model).

- ``clm``: windows of ``seq_len + 1`` tokens (inputs are tokens [0, T), targets [1, T]); the windows are the batch,
  or, with document masking, ``CLMDocumentCollator`` adds their documents;
- ``mlm``: windows of ``seq_len`` tokens, masked by ``MLMCollator`` (whole-word masking reads the run's tokenizer);
- ``span_corruption``: windows of T5's ``random_spans_helper`` raw length (568 for 512), corrupted by
  ``SpanCorruptionCollator`` into ``seq_len`` encoder tokens and ``target_length`` decoder tokens.

Every collator is a picklable callable that runs in DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from framework.catalogue import objective_spec
from framework.data.collators import (CLMDocumentCollator, MLMCollator, SpanCorruptionCollator, random_spans_helper,
                                      word_boundary_tables)
from framework.data.tokenizer import SpecialIds


def window_length(objective, seq_len: int) -> int:
    """Raw tokens per window for a model sequence length of ``seq_len`` (``objective``: an ObjectiveConfig)."""
    objective_spec(objective.name)  # an unknown objective: one sentence
    if objective.name == "clm":
        return seq_len + 1
    if objective.name == "mlm":
        return seq_len  # masking keeps the length: inputs and labels are both (B, seq_len)
    return random_spans_helper(seq_len, objective.noise_density, objective.mean_noise_span_length)[0]


def target_length(objective, seq_len: int) -> int:
    """Decoder tokens per example (span corruption's targets); for the other objectives, the model's ``seq_len``."""
    if objective.name == "span_corruption":
        return random_spans_helper(seq_len, objective.noise_density, objective.mean_noise_span_length)[1]
    return seq_len


def batch_collator(objective, seq_len: int, special_ids: SpecialIds, vocab_size: int,
                   tokenizer_path: str | Path | None = None, document_mask: bool = False) -> Callable | None:
    """The callable turning (B, ``window_length``) windows into the batch the objective's ``compute_loss`` takes,
    or None when the windows are the batch. ``document_mask``: the batch also carries ``document_ids`` (packed
    documents attend only to themselves). ``tokenizer_path``: the run's tokenizer.json (whole-word masking)."""
    ids = special_ids
    objective_spec(objective.name)  # an unknown objective: one sentence
    if objective.name == "clm":
        return CLMDocumentCollator(ids.eos) if document_mask else None
    if objective.name == "mlm":
        word_tables = None
        if objective.whole_word_masking:
            if not tokenizer_path:
                raise ValueError("objective.whole_word_masking needs the run's tokenizer, but no tokenizer path was "
                                 "given; build the data through PretrainDataModule.for_objective.")
            from framework.data.tokenizer import load_tokenizer

            word_tables = word_boundary_tables(load_tokenizer(tokenizer_path), ids.all)
        return MLMCollator(vocab_size=vocab_size, mask_id=ids.mask, special_ids=ids.all,
                           mask_probability=objective.mask_probability,
                           mask_token_fraction=objective.mask_token_fraction,
                           random_token_fraction=objective.random_token_fraction, word_tables=word_tables,
                           document_eos_id=ids.eos if document_mask else None)
    return SpanCorruptionCollator(
        tokens_length=window_length(objective, seq_len), sentinels=ids.sentinels, eos_id=ids.eos,
        decoder_start_id=ids.pad, noise_density=objective.noise_density,
        mean_noise_span_length=objective.mean_noise_span_length, document_mask=document_mask)
