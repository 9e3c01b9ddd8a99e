"""Batch builders for the masked-LM and span-corruption objectives.

Each collator is a picklable callable that turns a (B, window_length) LongTensor of raw packed tokens
into the batch its objective's ``compute_loss`` takes. Randomness comes from torch's global RNG, from an
explicit ``torch.Generator``, or from a list of B generators, one per row: then a row's draws come from its own
generator only, so a window is corrupted the same way whatever batch it lands in (the DataModule seeds each
sample's generator by its global stream position, so the masks do not depend on the number of ranks).

- Masked LM: Devlin et al. 2019 ("BERT", sec. 3.1 and appendix A.1): select ``mask_probability`` of the
  tokens (never special tokens or padding); of those, 80% become ``<mask>``, 10% a random regular token,
  10% stay unchanged; the loss is taken on the selected positions only. Whole-word masking (the BERT
  repository's 2019 update) selects whole words: every token of a selected word is selected.
- Span corruption: Raffel et al. 2020 ("T5", sec. 3.1.4), re-derived from the t5 codebase's
  ``random_spans_helper``, ``random_spans_noise_mask`` and ``noise_span_to_unique_sentinel``.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of positions that carry no loss (F.cross_entropy's default ignore_index)

Generators = torch.Generator | list[torch.Generator] | None


def rand_rows(batch: int, width: int, generator: Generators = None, device=None) -> torch.Tensor:
    """(batch, width) uniform draws in [0, 1); with a list of ``batch`` generators row i is drawn from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} rows; give one per row.")
        rows = [torch.rand(width, generator=g, device=device) for g in generator]
        return torch.stack(rows) if rows else torch.empty(0, width, device=device)
    return torch.rand(batch, width, generator=generator, device=device)


def randint_rows(high: int, batch: int, width: int, generator: Generators = None, device=None) -> torch.Tensor:
    """(batch, width) integers uniform in [0, high); per-row generators as in ``rand_rows``."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.randint(high, (width,), generator=g, device=device) for g in generator]
        return torch.stack(rows) if rows else torch.empty(0, width, dtype=torch.long, device=device)
    return torch.randint(high, (batch, width), generator=generator, device=device)


# ============================================================================ masked language modelling
def word_boundary_tables(tokenizer, special_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool tables over the vocabulary for byte-level BPE: (starts_word, ends_word), each (V,).

    A token starts a word when its string begins with a space, newline or tab byte ('Ġ', 'Ċ', 'ĉ' in
    the byte-level alphabet) or it is a special token; a token ends a word when it is special or ends
    with a newline, so the token after it starts a new word."""
    vocab = tokenizer.get_vocab_size()
    starts = torch.zeros(vocab, dtype=torch.bool)
    ends = torch.zeros(vocab, dtype=torch.bool)
    for token_id in range(vocab):
        piece = tokenizer.id_to_token(token_id) or ""
        starts[token_id] = piece[:1] in ("Ġ", "Ċ", "ĉ")
        ends[token_id] = piece.endswith("Ċ")
    specials = torch.tensor(special_ids, dtype=torch.long)
    starts[specials] = True
    ends[specials] = True
    return starts, ends


def word_ids(tokens: torch.Tensor, starts_word: torch.Tensor, ends_word: torch.Tensor) -> torch.Tensor:
    """tokens: (B, L) -> index of the word each token belongs to, counted from 0 in each row, (B, L)."""
    is_start = starts_word[tokens]
    is_start[:, 0] = True
    is_start[:, 1:] |= ends_word[tokens[:, :-1]]
    return is_start.long().cumsum(dim=1) - 1


def mask_tokens(tokens: torch.Tensor, *, mask_id: int, special_ids: torch.Tensor, regular_ids: torch.Tensor,
                mask_probability: float = 0.15, mask_token_fraction: float = 0.8, random_token_fraction: float = 0.1,
                word_index: torch.Tensor | None = None,
                generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``tokens`` (B, L) -> (inputs (B, L), labels (B, L) with IGNORE_INDEX where unselected).

    ``special_ids``: ids never selected (pad, bos, eos, unk, mask, sentinels). ``regular_ids``: ids a
    "random token" replacement is drawn from, uniformly. ``word_index`` (B, L) from ``word_ids`` switches on
    whole-word masking: a word is selected with ``mask_probability`` and all of its tokens with it, so the
    expected selected fraction of tokens is still ``mask_probability``. The 80/10/10 choice is per token."""
    B, L = tokens.shape
    eligible = ~torch.isin(tokens, special_ids)
    draw = rand_rows(B, L, generator, tokens.device)  # one draw per token, or per word
    if word_index is not None:
        draw = draw.gather(1, word_index)  # word w of a row uses draw[w]; a row has at most L words
    selected = eligible & (draw < mask_probability)
    action = rand_rows(B, L, generator, tokens.device)
    to_mask = selected & (action < mask_token_fraction)
    to_random = selected & (action >= mask_token_fraction) & (action < mask_token_fraction + random_token_fraction)
    random_tokens = regular_ids[randint_rows(len(regular_ids), B, L, generator, tokens.device)]
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, random_tokens, inputs)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs, labels


class MLMCollator:
    """(B, L) raw windows -> {"input_ids": (B, L), "labels": (B, L), "predict_index": (N,)} for masked-LM training."""

    def __init__(self, *, vocab_size: int, mask_id: int, special_ids: tuple[int, ...], mask_probability: float = 0.15,
                 mask_token_fraction: float = 0.8, random_token_fraction: float = 0.1,
                 word_tables: tuple[torch.Tensor, torch.Tensor] | None = None, document_eos_id: int | None = None
                 ) -> None:
        if not 0.0 < mask_probability < 1.0:
            raise ValueError(f"objective.mask_probability={mask_probability} must be strictly between 0 and 1.")
        if mask_token_fraction < 0 or random_token_fraction < 0 or mask_token_fraction + random_token_fraction > 1:
            raise ValueError(f"objective.mask_token_fraction={mask_token_fraction} and objective.random_token_fraction="
                             f"{random_token_fraction} must be non-negative and sum to at most 1.")
        self.mask_id = mask_id
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.regular_ids = torch.tensor([i for i in range(vocab_size) if i not in set(special_ids)], dtype=torch.long)
        self.mask_probability = mask_probability
        self.mask_token_fraction = mask_token_fraction
        self.random_token_fraction = random_token_fraction
        self.word_tables = word_tables
        self.document_eos_id = document_eos_id  # set: add "document_ids" for block-diagonal attention

    def __call__(self, windows: torch.Tensor, generator: Generators = None) -> dict[str, torch.Tensor]:
        word_index = word_ids(windows, *self.word_tables) if self.word_tables is not None else None
        inputs, labels = mask_tokens(
            windows, mask_id=self.mask_id, special_ids=self.special_ids, regular_ids=self.regular_ids,
            mask_probability=self.mask_probability, mask_token_fraction=self.mask_token_fraction,
            random_token_fraction=self.random_token_fraction, word_index=word_index, generator=generator)
        # the selected positions as flat row-major indices, computed here on the host: the model gathers them with
        # index_select, whose output size the host already knows (a boolean mask on the GPU would make it wait)
        predict_index = (labels.view(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
        batch = {"input_ids": inputs, "labels": labels, "predict_index": predict_index}
        if self.document_eos_id is not None:
            batch["document_ids"] = segment_ids(document_starts(windows, self.document_eos_id))
        return batch


# ============================================================================ T5 span corruption
def span_counts(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a window of ``tokens_length`` raw tokens, as T5 rounds them
    (Python's and TensorFlow's round both round half to even)."""
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return num_noise_tokens, num_noise_spans


def random_spans_helper(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1, extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """T5's ``random_spans_helper``: the raw length whose corruption fits ``inputs_length`` encoder tokens.

    Returns (tokens_length, targets_length): the largest raw length whose corrupted input (non-noise
    tokens + one sentinel per noise span + <eos>) is at most ``inputs_length``, and the length of its
    target (noise tokens + one sentinel per span + <eos>). At the defaults, 512 -> (568, 114)."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = span_counts(tokens_length, noise_density, mean_noise_span_length)
        return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5's "minor hack": at noise_density 0.5 make the targets no longer than the inputs
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def noise_mask_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) that ``random_spans_noise_mask`` uses, with T5's guards against
    degenerate windows: at least one noise and one non-noise token, at least one span."""
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def _random_segmentation(batch: int, num_items: int, num_segments: int, generator: Generators,
                         device) -> torch.Tensor:
    """Lengths (B, num_segments) of a uniformly random split of ``num_items`` into non-empty segments:
    the segment starts are ``num_segments - 1`` distinct cut points drawn from 1..num_items-1."""
    if num_segments == 1:
        return torch.full((batch, 1), num_items, dtype=torch.long, device=device)
    order = rand_rows(batch, num_items - 1, generator, device).argsort(dim=1)
    cuts = (order[:, : num_segments - 1] + 1).sort(dim=1).values  # (B, k-1)
    edges = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), cuts,
                       torch.full((batch, 1), num_items, dtype=torch.long, device=device)], dim=1)
    return edges.diff(dim=1)


def random_spans_noise_mask(batch: int, length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            generator: Generators = None, device=None) -> torch.Tensor:
    """T5's ``random_spans_noise_mask`` for ``batch`` windows: a bool (B, length) mask, True = noise.

    Exactly ``noise_mask_counts`` noise tokens in exactly that many spans; the non-noise and noise span
    lengths are independent uniform random segmentations, interleaved starting with non-noise, so every
    window starts with kept tokens and ends with a noise span (T5's default, without ``random_roll``)."""
    num_noise, num_spans = noise_mask_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise = max(length, 2) - num_noise
    if num_spans > num_nonnoise:
        raise ValueError(f"span corruption cannot place {num_spans} noise spans between {num_nonnoise} kept tokens; "
                         "lower objective.noise_density or raise objective.mean_noise_span_length.")
    noise_lengths = _random_segmentation(batch, num_noise, num_spans, generator, device)  # (B, k)
    nonnoise_lengths = _random_segmentation(batch, num_nonnoise, num_spans, generator, device)  # (B, k)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=2).reshape(batch, 2 * num_spans)
    span_starts = interleaved.cumsum(dim=1)[:, :-1]  # (B, 2k-1), strictly increasing, all < length
    indicator = torch.zeros(batch, max(length, 2), dtype=torch.long, device=device)
    indicator.scatter_(1, span_starts, 1)
    return (indicator.cumsum(dim=1) % 2 == 1)[:, :length]


def corrupt_spans(tokens: torch.Tensor, noise_mask: torch.Tensor, sentinels: torch.Tensor,
                  eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's span corruption of ``tokens`` (B, L) under ``noise_mask`` (B, L) -> (inputs, targets).

    Inputs: the kept tokens with the i-th noise span of a row replaced by ``sentinels[i]``, then <eos>.
    Targets: for each noise span i, ``sentinels[i]`` followed by the span's tokens, then <eos>. Every row
    must have the same number of noise tokens and spans (``random_spans_noise_mask`` guarantees it), so
    the outputs are dense (B, L - noise + spans + 1) and (B, noise + spans + 1) without padding."""
    B, L = tokens.shape
    previous = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=tokens.device), noise_mask[:, :-1]], dim=1)
    span_start = noise_mask & ~previous  # (B, L) first token of each noise span
    span_index = span_start.long().cumsum(dim=1) - 1  # (B, L) index of the current span (-1 before the first)
    num_spans = int(span_start.sum(dim=1).max()) if B else 0
    if num_spans > len(sentinels):
        raise ValueError(f"a window has {num_spans} noise spans but the tokenizer has only {len(sentinels)} sentinels; "
                         "lower data.seq_len or raise objective.mean_noise_span_length.")
    sentinel_tokens = sentinels.to(tokens.device)[span_index.clamp_min(0)]  # (B, L)
    eos = torch.full((B, 1), eos_id, dtype=tokens.dtype, device=tokens.device)

    def gather(keep_sentinel: torch.Tensor, keep_token: torch.Tensor) -> torch.Tensor:
        # slot 2i holds the sentinel that opens a span at position i, slot 2i+1 the token at position i
        values = torch.stack([sentinel_tokens, tokens], dim=2).reshape(B, 2 * L)
        keep = torch.stack([keep_sentinel, keep_token], dim=2).reshape(B, 2 * L)
        counts = keep.sum(dim=1)
        if B and not bool((counts == counts[0]).all()):
            raise ValueError("span corruption needs the same number of noise tokens and spans in every row.")
        return torch.cat([values[keep].reshape(B, -1), eos], dim=1)

    return gather(span_start, ~noise_mask), gather(span_start, noise_mask)


def shift_right(targets: torch.Tensor, decoder_start_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: (B, T) targets -> (B, T) = [start, targets[:, :-1]] (T5's _shift_right)."""
    start = torch.full_like(targets[:, :1], decoder_start_id)
    return torch.cat([start, targets[:, :-1]], dim=1)


class SpanCorruptionCollator:
    """(B, tokens_length) raw windows -> {"input_ids": (B, S), "decoder_input_ids": (B, T), "labels": (B, T)},
    with S and T the lengths ``random_spans_helper`` computes for the configured sequence length."""

    def __init__(self, *, tokens_length: int, sentinels: tuple[int, ...], eos_id: int, decoder_start_id: int,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, document_mask: bool = False) -> None:
        self.document_mask = document_mask  # add "document_ids" for the encoder's block-diagonal attention
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"objective.noise_density={noise_density} must be strictly between 0 and 1.")
        if mean_noise_span_length < 1.0:
            raise ValueError(f"objective.mean_noise_span_length={mean_noise_span_length} must be at least 1.")
        _, num_spans = noise_mask_counts(tokens_length, noise_density, mean_noise_span_length)
        if num_spans > len(sentinels):
            raise ValueError(f"span corruption of {tokens_length}-token windows makes {num_spans} noise spans, more than "
                             f"the {len(sentinels)} sentinel tokens; lower data.seq_len or raise "
                             "objective.mean_noise_span_length.")
        self.tokens_length = tokens_length
        self.sentinels = torch.tensor(sentinels, dtype=torch.long)
        self.eos_id, self.decoder_start_id = eos_id, decoder_start_id
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length

    def __call__(self, windows: torch.Tensor, generator: Generators = None) -> dict[str, torch.Tensor]:
        B, L = windows.shape
        if L != self.tokens_length:
            raise ValueError(f"span corruption expects windows of {self.tokens_length} tokens, got {L}.")
        noise = random_spans_noise_mask(B, L, self.noise_density, self.mean_noise_span_length, generator, windows.device)
        inputs, targets = corrupt_spans(windows, noise, self.sentinels, self.eos_id)
        batch = {"input_ids": inputs, "decoder_input_ids": shift_right(targets, self.decoder_start_id), "labels": targets}
        if self.document_mask:
            batch["document_ids"] = span_input_segments(segment_ids(document_starts(windows, self.eos_id)), noise)
        return batch


# ----------------------------------------------------------------------------- document masking
def segment_ids(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True where a new document begins (position 0 need not be marked) -> (B, T) long segment ids."""
    return starts.long().cumsum(dim=1) - starts[:, :1].long()


def document_starts(windows: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) raw windows -> (B, L) bool, True where a document starts: after each <eos> (documents are packed
    back to back with <eos> between them, the layout ``framework.data.prepare`` writes)."""
    starts = torch.zeros_like(windows, dtype=torch.bool)
    starts[:, 1:] = windows[:, :-1] == eos_id
    return starts


def span_input_segments(segments: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
    """The document of each encoder input token after ``corrupt_spans``: a kept token keeps its own, a sentinel
    takes the first token's of the span it replaces, the final <eos> the window's last. (B, L) -> (B, S)."""
    B, L = segments.shape
    previous = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=segments.device), noise_mask[:, :-1]], dim=1)
    span_start = noise_mask & ~previous
    values = torch.stack([segments, segments], dim=2).reshape(B, 2 * L)
    keep = torch.stack([span_start, ~noise_mask], dim=2).reshape(B, 2 * L)
    return torch.cat([values[keep].reshape(B, -1), segments[:, -1:]], dim=1)


class CLMDocumentCollator:
    """Causal LM with document masking: (B, seq_len + 1) windows -> {"tokens", "document_ids" (B, seq_len)}.

    A document's segment of the model input begins at the <eos> before it, which plays the part of a
    beginning-of-sequence token: every label (the document's tokens, then its closing <eos>) is predicted from
    its own document only, exactly as if the document were run by itself after a leading <eos>."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id

    def __call__(self, windows: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        inputs = windows[:, :-1]
        return {"tokens": windows, "document_ids": segment_ids(inputs == self.eos_id)}
