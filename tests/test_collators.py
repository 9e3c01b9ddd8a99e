"""Masked-LM and span-corruption batch builders: statistics over >= 1M tokens, exact T5 lengths, invertibility."""

from __future__ import annotations

import pickle

import pytest
import torch

from framework.data.collators import (
    IGNORE_INDEX, MLMCollator, SpanCorruptionCollator, corrupt_spans, random_spans_helper, random_spans_noise_mask,
    shift_right, word_boundary_tables, word_ids,
)
from framework.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4
SENTINELS = tuple(range(5, 105))
SPECIALS = (PAD, BOS, EOS, UNK, MASK) + SENTINELS
VOCAB = 8192


def synthetic_windows(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Regular tokens with ~8% special tokens mixed in (document ends, padding, stray sentinels)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=g)
    specials = torch.tensor(SPECIALS)[torch.randint(len(SPECIALS), (batch, length), generator=g)]
    return torch.where(torch.rand(batch, length, generator=g) < 0.08, specials, tokens)


# ============================================================================ masked LM
def test_mlm_selection_and_80_10_10_split_over_a_million_tokens():
    windows = synthetic_windows(1024, 1024)  # 1,048,576 tokens
    collate = MLMCollator(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    batch = collate(windows, generator=torch.Generator().manual_seed(1))
    inputs, labels = batch["input_ids"], batch["labels"]
    special = torch.isin(windows, torch.tensor(SPECIALS))
    selected = labels != IGNORE_INDEX

    # special tokens are never selected and never altered
    assert not (selected & special).any()
    assert torch.equal(inputs[special], windows[special])
    # unselected positions are untouched; selected positions are labelled with the original token
    assert torch.equal(inputs[~selected], windows[~selected])
    assert torch.equal(labels[selected], windows[selected])

    n_eligible = int((~special).sum())
    n_selected = int(selected.sum())
    # binomial std of the fraction: sqrt(0.15 * 0.85 / 9.6e5) = 3.6e-4; tolerance ~4 sigma
    assert abs(n_selected / n_eligible - 0.15) < 0.0015
    masked = selected & (inputs == MASK)
    unchanged = selected & (inputs == windows)
    replaced = selected & (inputs != MASK) & (inputs != windows)
    n_regular = VOCAB - len(SPECIALS)
    # a random replacement equals the original with probability 1/n_regular, which then counts as unchanged
    assert abs(int(masked.sum()) / n_selected - 0.8) < 0.005  # std 1.0e-3
    assert abs(int(replaced.sum()) / n_selected - 0.1 * (1 - 1 / n_regular)) < 0.004  # std 7.7e-4
    assert abs(int(unchanged.sum()) / n_selected - (0.1 + 0.1 / n_regular)) < 0.004
    # random replacements are regular tokens, spread over the whole regular vocabulary
    random_tokens = inputs[replaced]
    assert not torch.isin(random_tokens, torch.tensor(SPECIALS)).any()
    assert random_tokens.min() < len(SPECIALS) + 200 and random_tokens.max() > VOCAB - 200


def test_mlm_configured_probabilities_and_determinism():
    windows = synthetic_windows(256, 512, seed=3)
    collate = MLMCollator(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mask_probability=0.3,
                          mask_token_fraction=0.5, random_token_fraction=0.5)
    a = collate(windows, generator=torch.Generator().manual_seed(7))
    b = collate(windows, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    selected = a["labels"] != IGNORE_INDEX
    eligible = ~torch.isin(windows, torch.tensor(SPECIALS))
    assert abs(int(selected.sum()) / int(eligible.sum()) - 0.3) < 0.005
    masked = selected & (a["input_ids"] == MASK)
    assert abs(int(masked.sum()) / int(selected.sum()) - 0.5) < 0.01
    assert int((selected & (a["input_ids"] == windows)).sum()) < 0.002 * int(selected.sum())  # no "unchanged" share


def test_mlm_rejects_bad_fractions():
    with pytest.raises(ValueError, match="mask_probability"):
        MLMCollator(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mask_probability=0.0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        MLMCollator(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mask_token_fraction=0.8,
                    random_token_fraction=0.3)


@pytest.fixture(scope="module")
def small_tokenizer():
    text = ["the quick brown fox jumps over the lazy dog\nreturn the value of x", "def main():\n    print(value)"] * 40
    return train_tokenizer(text, 512)


def test_word_boundaries_follow_byte_level_spaces_and_newlines(small_tokenizer):
    tok = small_tokenizer
    starts, ends = word_boundary_tables(tok, SPECIALS)
    ids = tok.encode("the quick brown\nfox").ids
    pieces = [tok.id_to_token(i) for i in ids]
    words = word_ids(torch.tensor([ids]), starts, ends)[0].tolist()
    text_words = ["".join(p for p, w in zip(pieces, words) if w == k) for k in range(max(words) + 1)]
    # a word opens at a leading space ('Ġ') or newline ('Ċ') and after a newline; "fox" is two tokens, one word
    assert pieces == ["the", "Ġquick", "Ġbrown", "Ċ", "fo", "x"]
    assert text_words == ["the", "Ġquick", "Ġbrown", "Ċ", "fox"]
    assert bool(starts[tok.token_to_id("<eos>")]) and bool(ends[tok.token_to_id("<eos>")])


def test_whole_word_masking_selects_whole_words(small_tokenizer):
    tok = small_tokenizer
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(SPECIALS)
    starts, ends = word_boundary_tables(tok, SPECIALS)
    text = ("the quick brown fox jumps over the lazy dog\nreturn the value of x\ndef main():\n    print(value)"
            " extraordinarily unpredictable tokenization ") * 8
    ids = torch.tensor(tok.encode(text).ids)
    L = 256
    windows = torch.stack([ids[i : i + L] for i in range(0, len(ids) - L, 7)][:64]).repeat(64, 1)  # ~1M tokens
    windows[:, ::50] = EOS  # document boundaries
    collate = MLMCollator(vocab_size=tok.get_vocab_size(), mask_id=MASK, special_ids=SPECIALS, word_tables=(starts, ends))
    batch = collate(windows, generator=torch.Generator().manual_seed(0))
    selected = batch["labels"] != IGNORE_INDEX
    eligible = ~torch.isin(windows, torch.tensor(SPECIALS))
    words = word_ids(windows, starts, ends)
    # within a word every eligible token shares its word's decision
    key = words + torch.arange(windows.shape[0])[:, None] * (L + 1)  # (B, L) unique word key over the batch
    sel_per_word = torch.zeros(int(key.max()) + 1).index_add_(0, key[eligible], selected[eligible].float())
    n_per_word = torch.zeros(int(key.max()) + 1).index_add_(0, key[eligible], torch.ones(int(eligible.sum())))
    used = n_per_word > 0
    assert torch.all((sel_per_word[used] == 0) | (sel_per_word[used] == n_per_word[used]))
    assert (n_per_word[sel_per_word > 0] > 1).any()  # multi-token words were selected whole
    assert not (selected & ~eligible).any()
    # each word is selected with probability 0.15, so the expected token fraction is 0.15 too
    assert abs(int(selected.sum()) / int(eligible.sum()) - 0.15) < 0.005


# ============================================================================ span corruption
def t5_lengths_by_search(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """T5's random_spans_helper restated as a search: the largest raw length L whose corrupted input
    (L - noise + spans + eos) fits, with noise = round(L * density), spans = round(noise / mean_span)."""
    def corrupted(length):
        noise = round(length * density)
        spans = round(noise / mean_span)
        return length - noise + spans + 1, noise + spans + 1

    best = max(n for n in range(inputs_length, 4 * inputs_length) if corrupted(n)[0] <= inputs_length)
    inputs, targets = corrupted(best)
    if density == 0.5 and targets > inputs:  # T5's adjustment at noise_density 0.5
        return best - 1, targets - 1
    return best, targets


def test_random_spans_helper_matches_t5():
    # T5 (Raffel et al. 2020, span corruption with 512-token inputs): 568 raw tokens -> 512 inputs, 114 targets
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)
    # by hand: 141 raw tokens: noise round(21.15) = 21 in round(7.0) = 7 spans -> 120 + 7 + 1 = 128 inputs,
    # 21 + 7 + 1 = 29 targets; 142 tokens would give 129 inputs
    assert random_spans_helper(128, 0.15, 3.0) == (141, 29)
    for inputs_length, density, mean_span in [(64, 0.15, 3.0), (256, 0.15, 3.0), (512, 0.5, 3.0), (1024, 0.15, 3.0),
                                              (512, 0.3, 8.0), (200, 0.25, 2.0), (512, 0.15, 10.0)]:
        assert random_spans_helper(inputs_length, density, mean_span) == t5_lengths_by_search(inputs_length, density, mean_span)


@pytest.mark.parametrize("inputs_length,density,mean_span", [(512, 0.15, 3.0), (128, 0.15, 3.0), (512, 0.3, 8.0),
                                                             (64, 0.5, 3.0)])
def test_span_corruption_lengths_counts_and_sentinels(inputs_length, density, mean_span):
    raw_length, target_length = random_spans_helper(inputs_length, density, mean_span)
    collate = SpanCorruptionCollator(tokens_length=raw_length, sentinels=SENTINELS, eos_id=EOS, decoder_start_id=PAD,
                                     noise_density=density, mean_noise_span_length=mean_span)
    B = 64
    windows = torch.randint(len(SPECIALS), VOCAB, (B, raw_length))
    batch = collate(windows, generator=torch.Generator().manual_seed(0))
    inputs, labels = batch["input_ids"], batch["labels"]
    # these configurations all fill the inputs exactly, as T5's 568 -> 512 / 114 does
    assert inputs.shape == (B, inputs_length) and labels.shape == (B, target_length)
    assert (inputs[:, -1] == EOS).all() and (labels[:, -1] == EOS).all()
    assert torch.equal(batch["decoder_input_ids"], shift_right(labels, PAD))
    assert (batch["decoder_input_ids"][:, 0] == PAD).all()

    expected_noise = round(raw_length * density)
    expected_spans = round(expected_noise / mean_span)
    for row in range(B):
        sentinel_positions = torch.isin(labels[row], torch.tensor(SENTINELS))
        # sentinels appear in T5's order: <extra_id_0>, <extra_id_1>, ... in both inputs and targets
        assert labels[row][sentinel_positions].tolist() == list(SENTINELS[:expected_spans])
        assert inputs[row][torch.isin(inputs[row], torch.tensor(SENTINELS))].tolist() == list(SENTINELS[:expected_spans])
        assert labels.shape[1] - expected_spans - 1 == expected_noise  # noise tokens in the target
    assert expected_noise / expected_spans == pytest.approx(mean_span, rel=0.2)


def test_noise_mask_exact_counts_and_span_statistics():
    B, L = 2000, 568
    noise = random_spans_noise_mask(B, L, 0.15, 3.0, generator=torch.Generator().manual_seed(0))
    starts = noise & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool), noise[:, :-1]], dim=1)
    assert (noise.sum(1) == 85).all()  # round(568 * 0.15) = 85 noise tokens
    assert (starts.sum(1) == 28).all()  # round(85 / 3) = 28 spans, mean span length 85 / 28 = 3.04
    assert not noise[:, 0].any() and noise[:, -1].all()  # starts with kept tokens, ends inside a noise span
    # span lengths are a uniform random segmentation: 85 tokens into 28 non-empty spans, so a span's length
    # is 1 + Binomial-like with mean 85/28; P(length == 1) = C(83, 26) / C(84, 27) = 27/84
    edges = torch.diff(torch.cat([torch.zeros(B, 1), noise.float(), torch.zeros(B, 1)], dim=1), dim=1)  # (B, L+1)
    span_lengths = (torch.nonzero(edges == -1)[:, 1] - torch.nonzero(edges == 1)[:, 1]).float()  # row-major pairs
    assert span_lengths.mean().item() == pytest.approx(85 / 28, rel=1e-6)
    assert (span_lengths == 1).float().mean().item() == pytest.approx(27 / 84, abs=0.01)
    # noise is spread over the whole window: away from the ends (the first token is always kept, the last always
    # noise, as in T5) every quarter of the window has a noise rate near 0.15
    quarters = noise[:, 32:-32].float().chunk(4, dim=1)
    assert all(abs(q.mean().item() - 0.15) < 0.012 for q in quarters)


def merge_through_sentinels(inputs: list[int], targets: list[int]) -> list[int]:
    """Inverse of span corruption: put each sentinel's target span back where the sentinel sits in the input."""
    spans, current = {}, None
    for token in targets[:-1]:  # the last target token is <eos>
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    merged = []
    for token in inputs[:-1]:  # the last input token is <eos>
        merged.extend(spans[token] if token in SENTINELS else [token])
    return merged


def test_inputs_and_targets_merge_back_to_the_original():
    raw_length, _ = random_spans_helper(512)
    windows = torch.randint(len(SPECIALS), VOCAB, (32, raw_length))
    windows[:, 100] = EOS  # a document boundary inside the window is just another token
    collate = SpanCorruptionCollator(tokens_length=raw_length, sentinels=SENTINELS, eos_id=EOS, decoder_start_id=PAD)
    batch = collate(windows, generator=torch.Generator().manual_seed(5))
    assert batch["input_ids"].shape == (32, 512) and batch["labels"].shape == (32, 114)
    for row in range(32):
        merged = merge_through_sentinels(batch["input_ids"][row].tolist(), batch["labels"][row].tolist())
        assert merged == windows[row].tolist()


def test_corrupt_spans_on_a_hand_built_mask():
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    noise = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    inputs, targets = corrupt_spans(tokens, noise, torch.tensor(SENTINELS), EOS)
    assert inputs.tolist() == [[10, 5, 13, 14, 6, 16, 7, EOS]]
    assert targets.tolist() == [[5, 11, 12, 6, 15, 7, 17, EOS]]


def test_span_corruption_refuses_more_spans_than_sentinels():
    raw_length, _ = random_spans_helper(4096)  # ~ 151 noise spans > 100 sentinels
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruptionCollator(tokens_length=raw_length, sentinels=SENTINELS, eos_id=EOS, decoder_start_id=PAD)


def test_collators_pickle_for_dataloader_workers():
    windows = synthetic_windows(4, 141)
    for collate in (MLMCollator(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS),
                    SpanCorruptionCollator(tokens_length=141, sentinels=SENTINELS, eos_id=EOS, decoder_start_id=PAD)):
        clone = pickle.loads(pickle.dumps(collate))
        a = collate(windows, generator=torch.Generator().manual_seed(0))
        b = clone(windows, generator=torch.Generator().manual_seed(0))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================ the data side's choice per objective
def test_objective_batches_choose_window_length_and_collator_per_objective(tmp_path, small_tokenizer):
    from framework.data.collators import CLMDocumentCollator
    from framework.data.objective_batches import batch_collator, target_length, window_length
    from framework.data.tokenizer import SpecialIds
    from framework.objectives.config import ObjectiveConfig

    ids = SpecialIds(pad=PAD, bos=BOS, eos=EOS, unk=UNK, mask=MASK, sentinels=SENTINELS)
    clm, mlm, span = (ObjectiveConfig(name=n) for n in ("clm", "mlm", "span_corruption"))
    assert (window_length(clm, 512), window_length(mlm, 512), window_length(span, 512)) == (513, 512, 568)
    assert (target_length(span, 512), target_length(clm, 512)) == (114, 512)  # T5's 512 -> (568, 114)
    assert batch_collator(clm, 64, ids, VOCAB) is None  # causal LM: the windows are the batch
    assert isinstance(batch_collator(clm, 64, ids, VOCAB, document_mask=True), CLMDocumentCollator)
    windows = synthetic_windows(8, 64)
    batch = batch_collator(mlm, 64, ids, VOCAB)(windows, generator=torch.Generator().manual_seed(0))
    direct = MLMCollator(vocab_size=VOCAB, mask_id=MASK, special_ids=ids.all)(windows, generator=torch.Generator()
                                                                               .manual_seed(0))
    assert all(torch.equal(batch[k], direct[k]) for k in direct)  # the same masking statistics as before
    corrupted = batch_collator(span, 64, ids, VOCAB)(synthetic_windows(8, window_length(span, 64)))
    assert corrupted["input_ids"].shape == (8, 64) and corrupted["labels"].shape == (8, target_length(span, 64))
    whole_words = ObjectiveConfig(name="mlm", whole_word_masking=True)
    with pytest.raises(ValueError, match="whole_word_masking needs the run's tokenizer"):
        batch_collator(whole_words, 64, ids, VOCAB)
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert batch_collator(whole_words, 64, ids, VOCAB, tmp_path / "tokenizer.json").word_tables is not None
    with pytest.raises(ValueError, match="objective='ul2' is not one of"):
        window_length(ObjectiveConfig(name="ul2"), 64)
