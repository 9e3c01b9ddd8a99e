"""One byte-level BPE tokenizer for all three objectives.

Special tokens are reserved at fixed ids at the start of the vocabulary, so every objective finds them
in the same place: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<mask>`` 4 (masked LM), then the
span-corruption sentinels ``<extra_id_0>`` ... ``<extra_id_99>`` at ids 5..104, used in T5's order
(the first corrupted span gets ``<extra_id_0>``).
"""

from __future__ import annotations

import hashlib
import json
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
