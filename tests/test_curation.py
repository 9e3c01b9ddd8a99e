"""Data curation: planted duplicates and near-duplicates, one document built to fail each quality filter,
and the report of a real preparation (documents and tokens add up, token counts are the tokenizer's)."""

import dataclasses
import json
import random

import pytest

from framework.data.config import DataConfig
from framework.data.curation import (DUPLICATE_NGRAM_NS, QUALITY_FILTERS, STAGES, TOP_NGRAM_NS, CurationConfig,
                                     curate, normalize, quality_failure, quality_failures, shingles)
from framework.data.prepare import data_key, prepare_data

# ----------------------------------------------------------------------------- documents
PASS_LINES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Several members argued that the library needed new shelves and better lighting.",
    "Others wanted to spend the money on repairing the roof of the old town hall.",
    "After a long debate, they agreed to split the funds between both projects.",
    "The mayor thanked everyone for their patience and promised a report in spring.",
    "Local residents will be able to comment on the plan at a public meeting next month.",
]
PASS = "\n".join(PASS_LINES)  # 82 words of plain prose: passes every filter

NO_STOP_WORDS = "\n".join([  # none of the, be, to, of, and, that, have, with
    "Rain fell across northern valleys during Monday afternoon.",
    "Farmers said their crops looked healthy despite recent storms.",
    "Several roads near Millbrook were closed for repairs until Friday.",
    "Engineers expect traffic on those routes will return soon.",
    "Meanwhile, schools reopened after a week without heating.",
    "Parents praised teachers who kept lessons going online.",
    "Officials plan another inspection early next season.",
])
SUBJECTS = ["Anna", "Boris", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
            "Marco"]
VERBS = ["visited", "left", "photographed", "described", "loved", "toured", "praised", "mapped", "painted", "explored",
         "criticised", "sketched", "admired"]
WHEN = ["in spring", "last winter", "on Monday", "during August", "before dawn", "after lunch", "each summer",
        "twice yearly", "with friends", "by train", "for work", "at night", "in October"]


def _random_words(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def failing_documents() -> dict[str, str]:
    """filter name -> a document that passes every filter before it in QUALITY_FILTERS order and fails it."""
    long_words = _random_words(random.Random(0), 60, 12, 16)
    long_lines = [" ".join(long_words[i : i + 10]) + "." for i in range(0, 60, 10)]
    long_lines[0], long_lines[1] = "The " + long_lines[0], "Most of " + long_lines[1]  # two stop words
    halves = [h for line in PASS_LINES for h in (line[: len(line) // 2], line[len(line) // 2 :])]
    phrase = "the estimated cost of repairs had risen sharply since last autumn"
    return {
        "word_count": "The cat sat on the mat with the dog and that was fine.",  # 13 < 50 words
        "mean_word_length": "\n".join(long_lines),  # mean about 13 characters > 10
        "symbol_word_ratio": PASS + "\nFollow #budget #library #roof #townhall #spring #meeting #vote #news #council "
                                    "#city #plan today.",  # 11 '#' / 95 words > 0.1
        "bullet_lines": "\n".join("- " + line for line in PASS_LINES),  # 100% > 90% bullet lines
        "ellipsis_lines": "\n".join(line[:-1] + "..." if i % 2 else line for i, line in enumerate(PASS_LINES)),
        "alpha_words": PASS + "\nTotals were " + " ".join(str(n) for n in range(101, 126)) + ".",  # 25 numbers
        "stop_words": NO_STOP_WORDS,
        "punctuation_lines": "\n".join(line.rstrip(".") for line in PASS_LINES),  # 0% < 12%
        # 3 paragraphs of 4 lines, "Yes." as 3 more paragraphs: 2/6 repeated paragraphs, 2/15 repeated lines
        "duplicate_paragraphs": "\n\nYes.\n\n".join("\n".join(halves[i : i + 4]) for i in range(0, 12, 4))
                                + "\n\nYes.",
        # two long paragraphs repeated: 2/8 paragraphs (<= 0.3) but 26% of the characters (> 0.2)
        "duplicate_paragraph_chars": "\n\n".join(PASS_LINES + PASS_LINES[4:6]),
        "duplicate_lines": "\nYes.\n".join(PASS_LINES),  # 4/11 repeated lines, 3% of the characters
        "duplicate_line_chars": "\n".join(PASS_LINES + PASS_LINES[3:5]),  # one paragraph; 2/8 lines, 25% chars
        # "New York" 13 times in different contexts: 22% of word characters, no repeated 5-gram
        "top_ngram_chars": "\n".join(f"{s} {v} New York {w}." for s, v, w in zip(SUBJECTS, VERBS, WHEN))
                           + "\nAll of them agreed that the trip was worth it.",
        # an 11-word phrase twice in different lines: 20% of word characters in repeated 5..10-grams
        "duplicate_ngram_chars": PASS + f"\nOfficials warned that {phrase}.\nResidents learned that {phrase} again.",
    }


# ----------------------------------------------------------------------------- quality filters
def test_plain_prose_passes_every_filter_and_is_kept():
    cfg = CurationConfig(enabled=True)
    assert quality_failures(PASS, cfg) == []
    result = curate([("pass", PASS)], cfg)
    assert result.removed == {} and result.documents_in == 1


def test_every_filter_has_a_document_built_to_fail_it():
    assert set(failing_documents()) == set(QUALITY_FILTERS)


@pytest.mark.parametrize("name", list(QUALITY_FILTERS))
def test_a_document_built_to_fail_one_filter_is_removed_by_that_filter(name):
    cfg = CurationConfig(enabled=True)
    doc = failing_documents()[name]
    failures = quality_failures(doc, cfg)
    assert failures[0] == name and quality_failure(doc, cfg) == name
    # a repeated line or paragraph necessarily repeats its n-grams (and a paragraph its lines); all others
    # fail that one filter only
    also = {"duplicate_paragraph_chars": ["duplicate_line_chars", "duplicate_ngram_chars"],
            "duplicate_line_chars": ["duplicate_ngram_chars"]}
    assert failures == [name] + also.get(name, [])
    no_dedup = dataclasses.replace(cfg, exact_dedup=False, near_dedup=False)  # several are PASS re-punctuated
    assert curate([("pass", PASS), ("bad", doc)], no_dedup).removed == {1: name}
    # the threshold is the config value: turned off, the document is no longer removed by it
    off = {"word_count": dict(min_words=None), "mean_word_length": dict(max_mean_word_length=None),
           "symbol_word_ratio": dict(max_symbol_word_ratio=None), "bullet_lines": dict(max_bullet_line_fraction=None),
           "ellipsis_lines": dict(max_ellipsis_line_fraction=None), "alpha_words": dict(min_alpha_word_fraction=None),
           "stop_words": dict(min_stop_words=None), "punctuation_lines": dict(min_punctuation_line_fraction=None),
           "duplicate_paragraphs": dict(max_duplicate_paragraph_fraction=None),
           "duplicate_paragraph_chars": dict(max_duplicate_paragraph_char_fraction=None),
           "duplicate_lines": dict(max_duplicate_line_fraction=None),
           "duplicate_line_chars": dict(max_duplicate_line_char_fraction=None),
           "top_ngram_chars": dict(max_top_ngram_char_fraction=None),
           "duplicate_ngram_chars": dict(max_duplicate_ngram_char_fraction=None)}[name]
    assert name not in quality_failures(doc, dataclasses.replace(cfg, **off))


def test_thresholds_are_the_published_ones_and_bounds_are_config_values():
    cfg = CurationConfig()
    # Rae et al. 2021 App. A.1.1 and Table A1
    assert (cfg.min_words, cfg.max_words, cfg.min_mean_word_length, cfg.max_mean_word_length) == (50, 100_000, 3, 10)
    assert (cfg.max_symbol_word_ratio, cfg.max_bullet_line_fraction, cfg.max_ellipsis_line_fraction,
            cfg.min_alpha_word_fraction, cfg.min_stop_words) == (0.1, 0.9, 0.3, 0.8, 2)
    assert dict(zip(TOP_NGRAM_NS, cfg.max_top_ngram_char_fraction)) == {2: 0.20, 3: 0.18, 4: 0.16}
    assert dict(zip(DUPLICATE_NGRAM_NS, cfg.max_duplicate_ngram_char_fraction)) == {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    # 82 words: removed under max_words=81, kept at 82
    assert quality_failure(PASS, dataclasses.replace(cfg, max_words=81)) == "word_count"
    assert quality_failure(PASS, dataclasses.replace(cfg, max_words=82)) is None
    with pytest.raises(ValueError, match="one per n"):
        curate([], dataclasses.replace(cfg, max_top_ngram_char_fraction=[0.2, 0.18]))


# ----------------------------------------------------------------------------- deduplication
def test_normalisation_for_exact_hashing():
    assert normalize("  Hello,\tWORLD!\n\n It's  ﬁne. ") == "hello world its fine"  # NFKC turns the ligature into fi


def _jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def test_planted_exact_and_near_duplicates_are_removed_and_first_copies_kept():
    rng = random.Random(1)
    vocab = _random_words(rng, 3000, 3, 9)
    originals = [" ".join(rng.choice(vocab) for _ in range(400)) for _ in range(30)]
    docs = [(f"orig{i}", text) for i, text in enumerate(originals)]
    expected = {}
    for i in range(6):  # exact duplicates after normalisation: case, whitespace, punctuation
        variant = originals[i].upper().replace(" ", "  \n", 7) + " !!"
        expected[len(docs)] = "exact_duplicate"
        docs.append((f"exact{i}", variant))
    for i in range(6, 11):  # near-duplicates: 3 of 400 words changed
        words = originals[i].split()
        for pos in (50, 200, 350):
            words[pos] = "zzzchanged"
        near = " ".join(words)
        assert 0.9 < _jaccard(near, originals[i]) < 1.0  # well above the 0.8 threshold
        expected[len(docs)] = "near_duplicate"
        docs.append((f"near{i}", near))
    # a near-duplicate placed BEFORE its original: the first occurrence (the variant) is kept
    words = originals[12].split()
    words[100] = "zzzfirst"
    docs.insert(12, ("near-first", " ".join(words)))
    expected = {(k + 1 if k >= 12 else k): v for k, v in expected.items()}
    expected[13] = "near_duplicate"  # the original now comes second
    assert max(_jaccard(a, b) for i, a in enumerate(originals) for b in originals[:i]) < 0.05  # distinct are distinct
    off = {f.name: None for f in dataclasses.fields(CurationConfig) if f.name.startswith(("min_", "max_"))}
    cfg = CurationConfig(enabled=True, **off)
    result = curate(docs, cfg)
    assert result.removed == expected
    counts = result.removed_counts()
    assert (counts["exact_duplicate"], counts["near_duplicate"]) == (6, 6)
    # exact dedup alone: the near-duplicates stay
    assert set(curate(docs, dataclasses.replace(cfg, near_dedup=False)).removed.values()) == {"exact_duplicate"}


# ----------------------------------------------------------------------------- through prepare_data
def _corpus() -> list[str]:
    """20 distinct passing documents, 3 exact copies, 2 near copies, and one failing document per filter but
    two (PASS re-punctuated: after normalisation they are exact copies of the bullet_lines one)."""
    rng = random.Random(2)
    vocab = _random_words(rng, 2000, 3, 8)
    stop = ["the", "of", "and", "to", "with"]
    distinct = []
    for _ in range(20):
        lines = [" ".join(rng.choice(vocab) for _ in range(9)) + f" {rng.choice(stop)} {rng.choice(vocab)}."
                 for _ in range(16)]
        distinct.append("\n".join(lines))
    texts = distinct + [d.title() for d in distinct[:3]]
    for d in distinct[3:5]:
        words = d.split(" ")
        words[10] = "zzzchanged"
        texts.append(" ".join(words))
        assert _jaccard(texts[-1], d) > 0.9
    return texts + [doc for name, doc in failing_documents().items() if name not in _NOT_IN_CORPUS]


_NOT_IN_CORPUS = ("ellipsis_lines", "punctuation_lines")


def _files_cfg(tmp_path, **curation) -> DataConfig:
    path = tmp_path / "corpus.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus()))
    return DataConfig(source="files", paths=[str(path)], vocab_size=400, val_fraction=0.3, num_proc=1,
                      cache_dir=str(tmp_path / "cache"), curation=CurationConfig(**curation))


def test_prepared_report_adds_up_and_counts_the_tokenizers_tokens(tmp_path):
    cfg = _files_cfg(tmp_path, enabled=True)
    prepared = prepare_data(cfg, progress=False)
    report = json.loads((prepared.shard_dir / "curation_report.json").read_text())
    docs, toks = report["documents"], report["tokens"]
    texts = _corpus()
    assert docs["in"] == len(texts)
    assert docs["removed"]["exact_duplicate"] == 3 and docs["removed"]["near_duplicate"] == 2
    assert all(docs["removed"][name] == (name not in _NOT_IN_CORPUS) for name in QUALITY_FILTERS)
    assert docs["kept"] == 20 == sum(prepared.meta["documents"].values())
    assert docs["in"] == docs["kept"] + sum(docs["removed"].values())
    assert toks["in"] == toks["kept"] + sum(toks["removed"].values())
    # tokens are the tokenizer's count plus one <eos> per document, and the kept ones are what the shards hold
    tok = prepared.tokenizer()
    n_tokens = [len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts]
    assert toks["in"] == sum(n_tokens)
    assert toks["kept"] == sum(n_tokens[:20]) == sum(prepared.meta["tokens"].values())
    reasons = curate(list(enumerate(texts)), cfg.curation).removed
    for stage in STAGES:
        assert toks["removed"][stage] == sum(n for i, n in enumerate(n_tokens) if reasons.get(i) == stage)
    assert prepared.meta["curation"]["documents"] == docs


def test_curation_settings_are_part_of_the_cache_key(tmp_path):
    base = _files_cfg(tmp_path)
    on = _files_cfg(tmp_path, enabled=True)
    stricter = _files_cfg(tmp_path, enabled=True, max_symbol_word_ratio=0.05)
    assert len({data_key(base), data_key(on), data_key(stricter)}) == 3
    # turned off, the thresholds do not matter: an uncurated preparation keeps its key
    assert data_key(base) == data_key(_files_cfg(tmp_path, max_symbol_word_ratio=0.05))


def test_curation_of_the_embedded_corpus_end_to_end(tmp_path):
    # the settings of conf/data/stdlib_curated.yaml (test_configs composes it) on a 400-document slice
    cfg = DataConfig(source="stdlib", max_documents=400, vocab_size=512, num_proc=1, cache_dir=str(tmp_path),
                     curation=CurationConfig(enabled=True, min_words=20))
    prepared = prepare_data(cfg, progress=False)
    report = prepared.meta["curation"]
    assert report["documents"]["in"] == cfg.max_documents
    assert 0 < report["documents"]["kept"] < cfg.max_documents
    assert report["documents"]["kept"] == sum(prepared.meta["documents"].values())
    assert report["tokens"]["kept"] == sum(prepared.meta["tokens"].values())
    assert report["documents"]["removed"]["exact_duplicate"] > 0  # the stdlib repeats some docstrings verbatim
    assert (prepared.shard_dir / "curation_report.json").exists()
