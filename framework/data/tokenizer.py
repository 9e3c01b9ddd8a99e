"""One tokenizer for all three objectives: the framework's own byte-level BPE, or any ``tokenizer.json``.

The framework's own tokenizer reserves its special tokens at fixed ids at the start of the vocabulary:
``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<mask>`` 4 (masked LM), then the span-corruption
sentinels ``<extra_id_0>`` ... ``<extra_id_99>`` at ids 5..104, used in T5's order (the first corrupted span
gets ``<extra_id_0>``).

A given tokenizer (``data.tokenizer_path``: GPT-2, Llama, T5, BERT, ...) keeps every id it has. Each role is
found among its added tokens by the role's usual names (``ROLE_NAMES``); a role the objective needs that is
missing is appended after the last id as a special added token under the framework's name
(``add_missing_special_tokens``). A role no objective step uses and the tokenizer lacks (a CLM run's
``<pad>``, ``<mask>``) is aliased to ``<eos>``, as GPT-2's own tokenizer does for its pad/bos/unk.

``extend_tokenizer`` adds domain tokens to a trained tokenizer without moving any existing id (domain adaptation,
``recipes/domain_adapt.py``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

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
    others: tuple[int, ...] = ()  # the tokenizer's other special tokens (e.g. <|im_start|>): never masked

    def __post_init__(self) -> None:  # lists from JSON (meta.json, checkpoint hparams) become tuples
        object.__setattr__(self, "sentinels", tuple(self.sentinels))
        object.__setattr__(self, "others", tuple(self.others))

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.bos, self.eos, self.unk, self.mask) + self.sentinels + self.others


# Usual names of each role in tokenizers of the transformers ecosystem, the framework's own first
# (GPT-2/NeoX/Llama-3/Llama-2/T5/BERT/RoBERTa spellings).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("<pad>", "[PAD]", "<|padding|>", "<|pad|>", "<|finetune_right_pad_id|>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|bos|>"),
    "eos": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "[SEP]"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
}
# roles each objective's steps read; eos is needed by all (it separates documents in the shards)
OBJECTIVE_ROLES = {"clm": ("eos",), "mlm": ("eos", "pad", "mask"), "span_corruption": ("eos", "pad", "sentinels")}


def sentinel_name(i: int) -> str:
    return f"<extra_id_{i}>"


def _added(tok: Tokenizer) -> dict[str, tuple[int, bool]]:
    """Added tokens: content -> (id, special). Only these count as special tokens: a byte-level vocabulary
    may hold ``<s>`` as ordinary text."""
    return {t.content: (i, t.special) for i, t in tok.get_added_tokens_decoder().items()}


def find_roles(tok: Tokenizer) -> dict[str, int]:
    """Role -> id of each role present under one of its usual names; sentinels as ``sentinel_<i>``."""
    added = _added(tok)
    found = {}
    for role, names in ROLE_NAMES.items():
        name = next((n for n in names if n in added), None)
        if name is not None:
            found[role] = added[name][0]
    for i in range(NUM_SENTINELS):
        if sentinel_name(i) in added:
            found[f"sentinel_{i}"] = added[sentinel_name(i)][0]
    return found


def missing_special_tokens(tok: Tokenizer, objective: str) -> list[str]:
    """The framework names of the tokens ``objective`` needs that ``tok`` lacks (in the order they are added)."""
    if objective not in OBJECTIVE_ROLES:
        raise ValueError(f"data.special_tokens_for={objective!r} is not one of {sorted(OBJECTIVE_ROLES)}.")
    found = find_roles(tok)
    out = []
    for role in OBJECTIVE_ROLES[objective]:
        if role == "sentinels":
            out += [sentinel_name(i) for i in range(NUM_SENTINELS) if f"sentinel_{i}" not in found]
        elif role not in found:
            out.append(ROLE_NAMES[role][0])
    return out


def add_missing_special_tokens(tok: Tokenizer, objective: str, allowed: bool, where: str = "the tokenizer"
                               ) -> tuple[Tokenizer, list[str]]:
    """``tok`` with the special tokens ``objective`` needs appended after its last id; (tokenizer, names added).
    ``allowed=False`` (``data.tokenizer_add_tokens=false``: the tokenizer must stay exactly as given) turns a
    missing token into an error: there is then no room to add it."""
    names = missing_special_tokens(tok, objective)
    if not names:
        return tok, []
    if not allowed:
        raise ValueError(
            f"{where} has no {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} token"
            f"{'s' if len(names) > 1 else ''} that the {objective} objective needs and data.tokenizer_add_tokens=false "
            "forbids adding them: set it true (they are appended after the last id) or use a tokenizer that has them.")
    tok = Tokenizer.from_str(tok.to_str())  # a copy: the caller's tokenizer is unchanged
    top = max([*tok.get_vocab(with_added_tokens=True).values(), -1])
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    ids = [tok.token_to_id(n) for n in names]
    if ids != list(range(top + 1, top + 1 + len(names))):  # ids must follow the existing ones, in order
        raise ValueError(f"{where}: the tokens {names[:3]} were added at ids {ids[:3]}, not after the last id {top}; "
                         "its vocabulary has gaps, so save it again with transformers or add them yourself.")
    return tok, names


def special_ids(tok: Tokenizer) -> SpecialIds:
    """The roles of ``tok`` (after ``add_missing_special_tokens``): found by name, else aliased to ``<eos>``;
    sentinels: ``<extra_id_0>``... up to the first one missing."""
    found = find_roles(tok)
    if "eos" not in found:
        raise ValueError(f"the tokenizer has no end-of-document token (one of {ROLE_NAMES['eos']}); "
                         "prepare the data with it through data.tokenizer_path, which adds one.")
    eos = found["eos"]
    sentinels = []
    while f"sentinel_{len(sentinels)}" in found and len(sentinels) < NUM_SENTINELS:
        sentinels.append(found[f"sentinel_{len(sentinels)}"])
    roles = {r: found.get(r, eos) for r in ("pad", "bos", "eos", "unk", "mask")}
    taken = set(roles.values()) | set(sentinels)
    others = sorted(i for i, special in _added(tok).values() if special and i not in taken)
    return SpecialIds(**roles, sentinels=tuple(sentinels), others=tuple(others))


def special_token_map(tok: Tokenizer, added: list[str]) -> dict:
    """What meta.json and the model card record: role -> {"token", "id", "added"}; aliased roles point at
    ``<eos>``'s token; sentinels summarised as a count and their id range."""
    ids = special_ids(tok)
    out = {}
    for role in ("pad", "bos", "eos", "unk", "mask"):
        i = getattr(ids, role)
        token = tok.id_to_token(i)
        out[role] = {"token": token, "id": i, "added": token in added, "aliased_to_eos": role != "eos" and i == ids.eos}
    if ids.sentinels:
        out["sentinels"] = {"count": len(ids.sentinels), "first_id": ids.sentinels[0], "last_id": ids.sentinels[-1],
                            "added": sum(sentinel_name(i) in added for i in range(len(ids.sentinels)))}
    out["added_tokens"] = list(added)
    return out


DEFAULT_TRAIN_BYTES = 1_000_000_000  # data.tokenizer_train_bytes: see DataConfig


def tokenizer_settings(vocab_size: int, train_bytes: int = DEFAULT_TRAIN_BYTES) -> dict:
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise ValueError(
            f"data.vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least 512."
        )
    if train_bytes <= 0:
        raise ValueError(f"data.tokenizer_train_bytes={train_bytes} must be positive (bytes of training text the "
                         "tokenizer is trained on, e.g. 1000000000).")
    return {"kind": "byte_level_bpe", "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS, "min_frequency": 2,
            "version": 1, "train_bytes": train_bytes}


def bounded_texts(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """``texts`` until ``max_bytes`` UTF-8 bytes were given (the document that crosses the bound is the last)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return


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


def given_tokenizer(path: str | Path, objective: str, add_tokens: bool) -> tuple[Tokenizer, list[str], str]:
    """``data.tokenizer_path`` loaded, with the special tokens ``objective`` needs added when missing:
    (tokenizer, names added, hash of the file as given). Kept per process for an unchanged file: a 100k-token
    tokenizer takes seconds to parse and hash, and preparation asks for it three times (key, tokenizer, meta)."""
    file = Path(path).expanduser()
    file = file / TOKENIZER_FILE if file.is_dir() else file
    stat = file.stat() if file.is_file() else None
    key = (str(file.resolve()), stat and (stat.st_mtime_ns, stat.st_size), objective, add_tokens)
    if key not in _GIVEN or stat is None:
        tok = load_tokenizer(path)
        extended, added = add_missing_special_tokens(tok, objective, add_tokens, where=f"the tokenizer at {path}")
        _GIVEN.clear()  # one entry: a process prepares with one tokenizer at a time
        _GIVEN[key] = (extended, added, tokenizer_hash(tok))
    extended, added, digest = _GIVEN[key]
    return extended, list(added), digest


_GIVEN: dict[tuple, tuple[Tokenizer, list[str], str]] = {}


def given_identity(path: str | Path, objective: str, add_tokens: bool) -> dict:
    """Cache-key part of a given tokenizer: its hash, plus the tokens added (only when some are)."""
    _, added, digest = given_tokenizer(path, objective, add_tokens)
    return {"given": digest, **({"added": added} if added else {})}


def recorded_special_tokens(directory: Path, tok: Tokenizer) -> dict:
    """``special_token_map`` with the added names recorded in ``directory``'s tokenizer_settings.json."""
    settings = directory / "tokenizer_settings.json"
    added = json.loads(settings.read_text()).get("added", []) if settings.exists() else []
    return special_token_map(tok, added)


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or a directory holding one (as transformers' ``save_pretrained`` writes)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / TOKENIZER_FILE).exists() and any(path.glob("*.model")):
            raise FileNotFoundError(
                f"{path} has a SentencePiece .model but no {TOKENIZER_FILE}; convert it once with transformers: "
                f"AutoTokenizer.from_pretrained({str(path)!r}).save_pretrained({str(path)!r}).")
        path = path / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}; run `fw-prepare` (or a training run) to create it, or "
                                "point data.tokenizer_path at a tokenizer.json or a directory holding one.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises a plain Exception for any parse error
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a tokenizer.json the `tokenizers` library can read ({reason}); point "
                         "data.tokenizer_path at a tokenizer.json or a directory saved by save_pretrained.") from None


def save_tokenizer(tok: Tokenizer, directory: Path, settings: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (TOKENIZER_FILE + ".tmp")
    tok.save(str(tmp))
    tmp.replace(directory / TOKENIZER_FILE)
    (directory / "tokenizer_settings.json").write_text(json.dumps(settings, indent=2))
