"""Data curation: exact and near-duplicate removal and document-level quality filters.

A preparation stage (``data.curation.enabled=true``) run once over the documents of a source before the
tokenizer is trained. Each document gets at most one removal reason, checked in this fixed order
(``STAGES``): the first that applies is the one reported.

1. ``exact_duplicate``: the hash of the normalised text (``normalize``) was seen earlier in the stream.
2. Quality filters (``QUALITY_FILTERS``, in that order). Thresholds are from
   Gopher = Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
   Appendix A.1.1 (quality filter) and Table A1 (repetition removal), and
   C4 = Raffel et al. 2020, "Exploring the Limits of Transfer Learning" sec 2.2, whose line rule (keep lines
   ending in terminal punctuation) is applied per document as in FineWeb (Penedo et al. 2024, sec 3.3:
   remove documents whose fraction of lines ending in punctuation is <= 0.12).
3. ``near_duplicate``: the MinHash of the document's word n-gram shingles (``datasketch``) has estimated
   Jaccard similarity >= ``near_dedup_threshold`` with a document kept earlier (candidates from
   ``MinHashLSH``, then checked against the stored signatures). Lee et al. 2022, "Deduplicating Training
   Data Makes Language Models Better" sec 4.1: word 5-grams, threshold 0.8.

The pass is streaming and order-deterministic: of a set of duplicates the first occurrence is kept.
Near-duplicate checking keeps one signature per kept document in memory (``near_dedup_num_perm`` x 8 bytes).
"""

from __future__ import annotations

import hashlib
import re
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm


@dataclass
class CurationConfig:
    """Every threshold is a config value; ``null`` (None) turns that check off (1.0 turns off one n of a list)."""

    enabled: bool = False
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8  # Jaccard of word-shingle sets (Lee et al. 2022 sec 4.1)
    near_dedup_num_perm: int = 128  # MinHash permutations
    near_dedup_ngram: int = 5  # words per shingle (Lee et al. 2022 sec 4.1)
    near_dedup_seed: int = 1
    # Gopher quality filter (Rae et al. 2021, App. A.1.1)
    min_words: Optional[int] = 50
    max_words: Optional[int] = 100_000
    min_mean_word_length: Optional[float] = 3.0  # characters
    max_mean_word_length: Optional[float] = 10.0
    max_symbol_word_ratio: Optional[float] = 0.1  # '#' per word, and ellipses per word
    max_bullet_line_fraction: Optional[float] = 0.9  # lines starting with a bullet point
    max_ellipsis_line_fraction: Optional[float] = 0.3  # lines ending with an ellipsis
    min_alpha_word_fraction: Optional[float] = 0.8  # words with at least one alphabetic character
    min_stop_words: Optional[int] = 2  # distinct words of GOPHER_STOP_WORDS present
    # C4 (Raffel et al. 2020 sec 2.2) as a document rule (FineWeb, Penedo et al. 2024 sec 3.3)
    min_punctuation_line_fraction: Optional[float] = 0.12  # lines ending in terminal punctuation
    # Gopher repetition removal (Rae et al. 2021, App. A.1.1, Table A1)
    max_duplicate_line_fraction: Optional[float] = 0.30  # repeated lines / lines
    max_duplicate_paragraph_fraction: Optional[float] = 0.30  # repeated paragraphs / paragraphs
    max_duplicate_line_char_fraction: Optional[float] = 0.20  # characters in repeated lines / characters
    max_duplicate_paragraph_char_fraction: Optional[float] = 0.20
    # n = 2, 3, 4: characters covered by the most frequent word n-gram / word characters
    max_top_ngram_char_fraction: Optional[list[float]] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # n = 5 ... 10: characters covered by word n-grams that occur more than once / word characters
    max_duplicate_ngram_char_fraction: Optional[list[float]] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])


# Rae et al. 2021 App. A.1.1: "the, be, to, of, and, that, have, with"
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "‣", "◦", "⁃", "▪", "-", "*")
ELLIPSES = ("...", "…")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")  # C4 sec 2.2: period, !, ?, end quotation mark
TOP_NGRAM_NS = (2, 3, 4)
DUPLICATE_NGRAM_NS = (5, 6, 7, 8, 9, 10)


# ----------------------------------------------------------------------------- normalisation and hashing
def normalize(text: str) -> str:
    """The text exact deduplication compares: Unicode NFKC, case-folded, punctuation (Unicode category P*)
    deleted, runs of whitespace collapsed to one space, ends stripped. So "Hello,  World!" == "hello world"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def text_hash(text: str) -> bytes:
    """16-byte digest of ``normalize(text)``."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalised text (the whole text as one shingle when it has fewer than n words)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


# ----------------------------------------------------------------------------- quality statistics
_STRIP = string.punctuation + "“”‘’«»…–—"  # stripped from both ends of a word before measuring it


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(repeated items / items, characters in repeated items / characters): every occurrence after the first
    of an item counts as repeated (Rae et al. 2021 Table A1)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        seen.add(item)
    return dup_items / len(items), dup_chars / max(1, sum(len(i) for i in items))


def _top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the most frequent word n-gram times its count, over all word characters (0 when no
    n-gram repeats)."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / max(1, sum(len(w) for w in words))


def _duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by some word n-gram occurring more than once, each word counted once
    even where repeated n-grams overlap, over all word characters."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(words) + 1, dtype=np.int64)  # difference array over word positions
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i] += 1
            covered[i + n] -= 1
    mask = np.cumsum(covered[:-1]) > 0
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    return float(lengths[mask].sum() / max(1, lengths.sum()))


def _check_words(text, words, c):
    return (c.min_words is not None and len(words) < c.min_words) or (
        c.max_words is not None and len(words) > c.max_words)


def _check_mean_word_length(text, words, c):
    stripped = [w for w in (w.strip(_STRIP) for w in words) if w]
    mean = sum(map(len, stripped)) / len(stripped) if stripped else 0.0
    return (c.min_mean_word_length is not None and mean < c.min_mean_word_length) or (
        c.max_mean_word_length is not None and mean > c.max_mean_word_length)


def _check_symbol_word_ratio(text, words, c):
    if c.max_symbol_word_ratio is None:
        return False
    n = max(1, len(words))
    hashes, ellipses = text.count("#"), text.count("...") + text.count("…")
    return hashes / n > c.max_symbol_word_ratio or ellipses / n > c.max_symbol_word_ratio


def _check_bullet_lines(text, words, c):
    lines = _lines(text)
    return c.max_bullet_line_fraction is not None and bool(lines) and (
        sum(line.startswith(BULLETS) for line in lines) / len(lines) > c.max_bullet_line_fraction)


def _check_ellipsis_lines(text, words, c):
    lines = _lines(text)
    return c.max_ellipsis_line_fraction is not None and bool(lines) and (
        sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > c.max_ellipsis_line_fraction)


def _check_alpha_words(text, words, c):
    return c.min_alpha_word_fraction is not None and (
        sum(any(ch.isalpha() for ch in w) for w in words) / max(1, len(words)) < c.min_alpha_word_fraction)


def _check_stop_words(text, words, c):
    return c.min_stop_words is not None and (
        len(GOPHER_STOP_WORDS & {w.strip(_STRIP).lower() for w in words}) < c.min_stop_words)


def _check_punctuation_lines(text, words, c):
    lines = _lines(text)
    return c.min_punctuation_line_fraction is not None and (
        sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / max(1, len(lines))
        < c.min_punctuation_line_fraction)


def _check_duplicate_lines(text, words, c):
    return c.max_duplicate_line_fraction is not None and (
        _duplicate_fractions(_lines(text))[0] > c.max_duplicate_line_fraction)


def _check_duplicate_paragraphs(text, words, c):
    return c.max_duplicate_paragraph_fraction is not None and (
        _duplicate_fractions(_paragraphs(text))[0] > c.max_duplicate_paragraph_fraction)


def _check_duplicate_line_chars(text, words, c):
    return c.max_duplicate_line_char_fraction is not None and (
        _duplicate_fractions(_lines(text))[1] > c.max_duplicate_line_char_fraction)


def _check_duplicate_paragraph_chars(text, words, c):
    return c.max_duplicate_paragraph_char_fraction is not None and (
        _duplicate_fractions(_paragraphs(text))[1] > c.max_duplicate_paragraph_char_fraction)


def _check_top_ngram_chars(text, words, c):
    limits = c.max_top_ngram_char_fraction
    return limits is not None and any(
        _top_ngram_char_fraction(words, n) > limit for n, limit in zip(TOP_NGRAM_NS, limits))


def _check_duplicate_ngram_chars(text, words, c):
    limits = c.max_duplicate_ngram_char_fraction
    return limits is not None and any(
        _duplicate_ngram_char_fraction(words, n) > limit
        for n, limit in zip(DUPLICATE_NGRAM_NS, limits))


# name -> check(text, words, cfg) -> True when the document fails; checked in this order
QUALITY_FILTERS: dict[str, Callable] = {
    "word_count": _check_words,
    "mean_word_length": _check_mean_word_length,
    "symbol_word_ratio": _check_symbol_word_ratio,
    "bullet_lines": _check_bullet_lines,
    "ellipsis_lines": _check_ellipsis_lines,
    "alpha_words": _check_alpha_words,
    "stop_words": _check_stop_words,
    "punctuation_lines": _check_punctuation_lines,
    # paragraphs before lines: a repeated paragraph repeats its lines too, and is reported as the coarser unit
    "duplicate_paragraphs": _check_duplicate_paragraphs,
    "duplicate_paragraph_chars": _check_duplicate_paragraph_chars,
    "duplicate_lines": _check_duplicate_lines,
    "duplicate_line_chars": _check_duplicate_line_chars,
    "top_ngram_chars": _check_top_ngram_chars,
    "duplicate_ngram_chars": _check_duplicate_ngram_chars,
}
STAGES = ("exact_duplicate", *QUALITY_FILTERS, "near_duplicate")


def quality_failures(text: str, cfg: CurationConfig) -> list[str]:
    """Names of every quality filter the document fails, in ``QUALITY_FILTERS`` order."""
    words = text.split()  # Gopher's words: whitespace-separated
    return [name for name, check in QUALITY_FILTERS.items() if check(text, words, cfg)]


def quality_failure(text: str, cfg: CurationConfig) -> str | None:
    """Name of the first quality filter (in ``QUALITY_FILTERS`` order) the document fails, or None."""
    words = text.split()
    return next((name for name, check in QUALITY_FILTERS.items() if check(text, words, cfg)), None)


# ----------------------------------------------------------------------------- the pass
class NearDuplicateIndex:
    """MinHash LSH over word shingles: ``add(key, text)`` returns True (and keeps nothing) when the text is a
    near-duplicate of one added before, else remembers it and returns False."""

    def __init__(self, cfg: CurationConfig) -> None:
        from datasketch import MinHash, MinHashLSH  # imported here: the GPU image runs without it

        self.ngram, self.threshold = cfg.near_dedup_ngram, cfg.near_dedup_threshold
        self._template = MinHash(num_perm=cfg.near_dedup_num_perm, seed=cfg.near_dedup_seed)
        self._lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.near_dedup_num_perm)
        self._signatures: dict[str, np.ndarray] = {}

    def add(self, key: str, text: str) -> bool:
        m = self._template.copy()  # empty, sharing the template's permutations (not regenerated per document)
        m.update_batch(list(shingles(text, self.ngram)))
        for other in self._lsh.query(m):  # candidates; keep only those whose estimated Jaccard passes
            if float(np.mean(self._signatures[other] == m.hashvalues)) >= self.threshold:
                return True
        self._lsh.insert(key, m)
        self._signatures[key] = m.hashvalues.copy()
        return False


@dataclass
class CurationResult:
    removed: dict[int, str]  # document position in the source's stream -> removal reason (a STAGES name)
    documents_in: int
    seconds: float

    def reason(self, position: int) -> str | None:
        return self.removed.get(position)

    def removed_counts(self) -> dict[str, int]:
        counts = Counter(self.removed.values())
        return {stage: counts.get(stage, 0) for stage in STAGES}


def check_config(cfg: CurationConfig) -> None:
    """Refuse settings that would silently do something else than asked."""
    for name, ns in (("max_top_ngram_char_fraction", TOP_NGRAM_NS),
                     ("max_duplicate_ngram_char_fraction", DUPLICATE_NGRAM_NS)):
        limits = getattr(cfg, name)
        if limits is not None and len(limits) != len(ns):
            raise ValueError(f"data.curation.{name} has {len(limits)} values; it needs one per n in {list(ns)} "
                             "(1.0 turns one off, null turns all off).")
    if cfg.near_dedup and not 0.0 < cfg.near_dedup_threshold <= 1.0:
        raise ValueError(f"data.curation.near_dedup_threshold={cfg.near_dedup_threshold} must be in (0, 1].")
    if cfg.near_dedup and (cfg.near_dedup_ngram < 1 or cfg.near_dedup_num_perm < 2):
        raise ValueError("data.curation.near_dedup_ngram must be >= 1 and data.curation.near_dedup_num_perm >= 2.")


def curate(documents: Iterable[tuple[str, str]], cfg: CurationConfig, progress: bool = False) -> CurationResult:
    """One streaming pass over ``(doc_id, text)`` pairs; documents are identified by their position in the
    stream (ids need not be unique). The first occurrence of a duplicate is kept."""
    check_config(cfg)
    t0 = time.time()
    seen_hashes: set[bytes] = set()
    near = NearDuplicateIndex(cfg) if cfg.near_dedup else None
    removed: dict[int, str] = {}
    bar = tqdm(desc="curating", unit="doc", disable=not progress, mininterval=2.0)
    position = -1
    for position, (_, text) in enumerate(documents):
        bar.update(1)
        if cfg.exact_dedup:
            digest = text_hash(text)
            if digest in seen_hashes:
                removed[position] = "exact_duplicate"
                continue
            seen_hashes.add(digest)
        reason = quality_failure(text, cfg)
        if reason is None and near is not None and near.add(str(position), text):
            reason = "near_duplicate"
        if reason is not None:
            removed[position] = reason
        if position % 1000 == 0:
            bar.set_postfix(removed=len(removed))
    bar.close()
    return CurationResult(removed, position + 1, round(time.time() - t0, 2))


# ----------------------------------------------------------------------------- the report
def build_report(result: CurationResult, tokens_by_reason: dict[str | None, int], config: dict) -> dict:
    """Documents and tokens in, removed by each stage, and kept. ``tokens_by_reason[None]`` = kept tokens."""
    docs_removed = result.removed_counts()
    tokens_removed = {stage: int(tokens_by_reason.get(stage, 0)) for stage in STAGES}
    docs_kept = result.documents_in - sum(docs_removed.values())
    tokens_kept = int(tokens_by_reason.get(None, 0))
    return {
        "documents": {"in": result.documents_in, "removed": docs_removed, "kept": docs_kept},
        "tokens": {"in": tokens_kept + sum(tokens_removed.values()), "removed": tokens_removed, "kept": tokens_kept},
        "seconds": result.seconds,
        "config": config,
    }


def format_report(report: dict) -> str:
    docs, toks = report["documents"], report["tokens"]

    def pct(x: int, total: int) -> str:
        return f"{100.0 * x / total:6.2f}%" if total else "      -"

    rows = [f"{'curation stage':<28}{'documents':>12}{'':>9}{'tokens':>14}{'':>9}",
            f"{'in':<28}{docs['in']:>12,}{'':>9}{toks['in']:>14,}{'':>9}"]
    for stage in STAGES:
        d, t = docs["removed"][stage], toks["removed"][stage]
        if d:
            rows.append(f"{'- ' + stage:<28}{d:>12,}{pct(d, docs['in']):>9}{t:>14,}{pct(t, toks['in']):>9}")
    rows.append(f"{'kept':<28}{docs['kept']:>12,}{pct(docs['kept'], docs['in']):>9}"
                f"{toks['kept']:>14,}{pct(toks['kept'], toks['in']):>9}")
    return "\n".join(rows)
