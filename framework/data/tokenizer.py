"""One byte-level BPE tokenizer for all three objectives.

Special tokens are reserved at fixed ids at the start of the vocabulary, so every objective finds them
in the same place: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<mask>`` 4 (masked LM), then the
span-corruption sentinels ``<extra_id_0>`` ... ``<extra_id_99>`` at ids 5..104, used in T5's order
(the first corrupted span gets ``<extra_id_0>``).

``extend_tokenizer`` adds domain tokens to a trained tokenizer without moving any existing id (domain adaptation,
``recipes/domain_adapt.py``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NUM_SENTINELS = 100
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    unk: int
    mask: int
    sentinels: tuple[int, ...]  # sentinels[i] is <extra_id_i>

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.bos, self.eos, self.unk, self.mask) + self.sentinels


def special_ids(tok: Tokenizer) -> SpecialIds:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if any(i is None for i in ids):
        raise ValueError("tokenizer lacks the framework's special tokens; retrain it with framework.data.tokenizer.")
    return SpecialIds(pad=ids[0], bos=ids[1], eos=ids[2], unk=ids[3], mask=ids[4], sentinels=tuple(ids[5:]))


def tokenizer_settings(vocab_size: int) -> dict:
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise ValueError(
            f"data.vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least 512."
        )
    return {"kind": "byte_level_bpe", "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS, "min_frequency": 2,
            "version": 1}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    settings = tokenizer_settings(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=settings["min_frequency"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def extend_tokenizer(base: Tokenizer, texts: Iterable[str], num_new_tokens: int, min_frequency: int = 2) -> Tokenizer:
    """``base`` plus up to ``num_new_tokens`` BPE tokens learnt on ``texts`` (a domain corpus); every id is kept.

    BPE training (Sennrich et al. 2016, sec. 3.2) continued from the base's segmentation: each domain word (split
    by the base's byte-level pre-tokenizer) starts as the base's tokens for it, then the most frequent adjacent
    pair is merged, repeatedly (ties broken by the pair's text, so the result is deterministic). Each merge is
    appended to ``model.merges`` after all of the base's, and its token (when new) to ``model.vocab`` at the next
    id. Consequences: (1) ids 0..V-1, special tokens included, mean what they meant; (2) base merges always
    outrank new ones, and new tokens appear in no base merge, so a text is first split exactly as the base splits
    it and only then coarsened: where no new merge applies, the tokenization is the base's; (3) every new merge
    fires on the domain text (a BPE trained from bytes on the domain alone proposes merges such as
    ``Li + cense`` that can never fire once the base has already split the word as ``Lic + ense``).
    The tokens go into the BPE model itself, not ``added_tokens``: added tokens match anywhere, across word
    boundaries, and bypass the merges. ``min_frequency``: a pair seen fewer times in ``texts`` is never merged.
    """
    spec = json.loads(base.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("pre_tokenizer") is None:
        raise ValueError("extend_tokenizer needs a byte-level BPE tokenizer of this framework "
                         "(framework.data.tokenizer).")
    vocab: dict[str, int] = model["vocab"]
    next_id = max(max(vocab.values()), max((t["id"] for t in spec.get("added_tokens", [])), default=-1)) + 1
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)  # older files: "a b"

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in base.pre_tokenizer.pre_tokenize_str(text))
    words = [[t.value for t in base.model.tokenize(w)] for w in counts]  # base segmentation of each distinct word
    freqs = list(counts.values())

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    added = 0
    while added < num_new_tokens and heap:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_counts.get(pair, 0):
            continue  # stale entry: the count changed since it was pushed
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b
        model["merges"].append(f"{a} {b}" if string_merges else [a, b])
        if merged not in vocab:
            vocab[merged] = next_id
            next_id += 1
            added += 1
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            old = words[i]
            new, j = [], 0
            while j < len(old):  # merge left to right, as BPE applies one merge to a word
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for p in zip(old, old[1:]):
                pair_counts[p] -= freqs[i]
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
            words[i] = new
        pair_counts.pop(pair, None)
        for p in touched:
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}; run `fw-prepare` (or a training run) to create it.")
    return Tokenizer.from_file(str(path))


def save_tokenizer(tok: Tokenizer, directory: Path, settings: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (TOKENIZER_FILE + ".tmp")
    tok.save(str(tmp))
    tmp.replace(directory / TOKENIZER_FILE)
    (directory / "tokenizer_settings.json").write_text(json.dumps(settings, indent=2))
