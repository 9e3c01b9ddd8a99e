"""Tokenize a text source into packed, memory-mapped token shards.

Layout under ``data.cache_dir``::

    <source>-<key>/                 key = hash(source fingerprint, tokenizer settings, curation config if on)
        tokenizer.json              byte-level BPE trained on the training split
        tokenizer_settings.json
        shards/train_00000.bin ...  documents' tokens, each followed by <eos>, back to back
        shards/val_00000.bin ...
        shards/curation_report.json when data.curation.enabled: documents and tokens in, removed per filter, kept
        shards/meta.json            written last: its presence marks a complete preparation

Shards are raw little-endian arrays (uint16 when the vocabulary fits, else uint32) read with
``numpy.memmap``. Preparation runs under a file lock, so every rank of a distributed job can call it:
the first builds, the others wait and reuse. Preparing the same data twice reuses the shards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from framework.data import tokenizer as tk
from framework.data.config import DataConfig
from framework.data.curation import CurationResult, build_report, curate, format_report
from framework.data.sources import is_validation, iter_documents, source_fingerprint

FORMAT_VERSION = 1


class PreparedView:
    """What training reads of prepared data (one source's ``PreparedData`` or a ``PreparedMixture``): the
    vocabulary size and token dtype from ``meta``, and the tokenizer at ``tokenizer_path``."""

    meta: dict
    tokenizer_path: Path

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokenizer(self):
        return tk.load_tokenizer(self.tokenizer_path)


@dataclass
class PreparedData(PreparedView):
    directory: Path
    meta: dict

    @property
    def shard_dir(self) -> Path:
        return self.directory / "shards"

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / tk.TOKENIZER_FILE

    def shards(self, split: str) -> list[Path]:
        return [self.shard_dir / name for name in self.meta["shards"][split]]

    def special_ids(self) -> tk.SpecialIds:
        return tk.SpecialIds(**{k: (tuple(v) if k == "sentinels" else v) for k, v in self.meta["special_ids"].items()})


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tokenizer_identity(cfg: DataConfig) -> dict:
    """The given tokenizer's content hash, or the settings a new one is trained with."""
    if cfg.tokenizer_path:  # (tokenizer helper) hash as given, plus the special tokens added for the objective
        return tk.given_identity(cfg.tokenizer_path, cfg.special_tokens_for, cfg.tokenizer_add_tokens)
    return tk.tokenizer_settings(cfg.vocab_size, cfg.tokenizer_train_bytes)


def data_key(cfg: DataConfig) -> str:
    identity = {"source": source_fingerprint(cfg), "tokenizer": _tokenizer_identity(cfg), "format": FORMAT_VERSION}
    if cfg.curation.enabled:  # only when on, so uncurated preparations keep their keys
        identity["curation"] = asdict(cfg.curation)
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Train (or reuse) the tokenizer and tokenize the corpus into shards (or reuse them)."""
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be strictly between 0 and 1.")
    directory = Path(cfg.cache_dir).expanduser().resolve() / f"{cfg.source}-{data_key(cfg)}"
    meta_path = directory / "shards" / "meta.json"
    with _file_lock(directory.parent / f".{directory.name}.lock"):
        if meta_path.exists():
            return PreparedData(directory, json.loads(meta_path.read_text()))
        directory.mkdir(parents=True, exist_ok=True)
        # one curation pass (when on); both passes below skip the documents it removes
        curation = curate(iter_documents(cfg), cfg.curation, progress) if cfg.curation.enabled else None
        tok = _tokenizer(cfg, directory, progress, curation)
        meta = _tokenize_to_shards(cfg, directory, tok, progress, curation)
        return PreparedData(directory, meta)


def _train_texts(cfg: DataConfig, bar: tqdm | None, curation: CurationResult | None = None) -> Iterator[str]:
    for position, (doc_id, text) in enumerate(iter_documents(cfg)):
        if bar is not None:
            bar.update(1)
        if (curation is None or curation.reason(position) is None) and not is_validation(doc_id, cfg.val_fraction):
            yield text


def _tokenizer(cfg: DataConfig, directory: Path, progress: bool, curation: CurationResult | None = None):
    path = directory / tk.TOKENIZER_FILE
    settings_path = directory / "tokenizer_settings.json"
    if cfg.tokenizer_path:  # a given tokenizer, with the special tokens the objective needs appended when missing:
        # saved beside the shards (the extended one), so the prepared directory is self-contained
        tok, added, digest = tk.given_tokenizer(cfg.tokenizer_path, cfg.special_tokens_for, cfg.tokenizer_add_tokens)
        tk.save_tokenizer(tok, directory, {"kind": "given", "source": str(cfg.tokenizer_path), "hash": digest,
                                           "objective": cfg.special_tokens_for, "added": added})
        if progress and added:
            print(f"tokenizer: {cfg.tokenizer_path} ({tok.get_vocab_size()} tokens after adding {len(added)} special "
                  f"tokens the {cfg.special_tokens_for} objective needs: {', '.join(added[:4])}"
                  f"{' ...' if len(added) > 4 else ''})")
        return tok
    settings = tk.tokenizer_settings(cfg.vocab_size, cfg.tokenizer_train_bytes)
    if path.exists() and settings_path.exists() and json.loads(settings_path.read_text()) == settings:
        return tk.load_tokenizer(path)  # same corpus (the directory key) and same settings: reuse
    t0 = time.time()
    bar = tqdm(desc="training tokenizer (documents read)", unit="doc", disable=not progress, mininterval=2.0)
    # a bounded sample: the first data.tokenizer_train_bytes of training text in source order
    tok = tk.train_tokenizer(tk.bounded_texts(_train_texts(cfg, bar, curation), cfg.tokenizer_train_bytes),
                             cfg.vocab_size)
    bar.close()
    tk.save_tokenizer(tok, directory, settings)
    if progress:
        print(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens, trained in {time.time() - t0:.1f}s -> {path}")
    return tok


# ----------------------------------------------------------------------------- parallel tokenization
_worker_tok = None


def _worker_init(tokenizer_path: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = tk.load_tokenizer(tokenizer_path)


def _encode_chunk(args: tuple[list[tuple[str, str, str | None]], float, int],
                  ) -> list[tuple[bool, np.ndarray, str | None]]:
    """(doc_id, text, curation removal reason or None) -> (is validation, tokens + <eos>, reason)."""
    docs, val_fraction, eos = args
    encodings = _worker_tok.encode_batch([text for _, text, _ in docs], add_special_tokens=False)
    out = []
    for (doc_id, _, reason), enc in zip(docs, encodings):
        ids = np.empty(len(enc.ids) + 1, dtype=np.int64)
        ids[:-1] = enc.ids
        ids[-1] = eos
        out.append((is_validation(doc_id, val_fraction), ids, reason))
    return out


def _chunks(cfg: DataConfig, eos: int, curation: CurationResult | None = None,
            size: int = 128) -> Iterator[tuple[list[tuple[str, str, str | None]], float, int]]:
    buf: list[tuple[str, str, str | None]] = []
    for position, (doc_id, text) in enumerate(iter_documents(cfg)):
        # removed documents are tokenized too, so the curation report can count their tokens
        buf.append((doc_id, text, None if curation is None else curation.reason(position)))
        if len(buf) == size:
            yield buf, cfg.val_fraction, eos
            buf = []
    if buf:
        yield buf, cfg.val_fraction, eos


class _ShardWriter:
    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.names: list[str] = []
        self.tokens = 0
        self._in_shard = 0
        self._f = None
        self.counts: np.ndarray | None = None

    def write(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            if self._f is None or self._in_shard >= self.shard_tokens:
                self._roll()
            take = min(len(ids) - pos, self.shard_tokens - self._in_shard)
            ids[pos : pos + take].astype(self.dtype).tofile(self._f)
            self._in_shard += take
            pos += take
        self.tokens += len(ids)

    def _roll(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.names):05d}.bin"
        self.names.append(name)
        self._f = open(self.directory / name, "wb")
        self._in_shard = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _tokenize_to_shards(cfg: DataConfig, directory: Path, tok, progress: bool,
                        curation: CurationResult | None = None) -> dict:
    specials = tk.special_ids(tok)
    vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)
    tmp = directory / "shards.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = {s: _ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    val_counts = np.zeros(vocab, dtype=np.int64)
    docs = {"train": 0, "val": 0}
    tokens_by_reason: dict[str | None, int] = {}  # curation removal reason (None = kept) -> tokens incl. <eos>
    t0 = time.time()
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, mininterval=2.0)
    chunks = _chunks(cfg, specials.eos, curation)
    num_proc = max(1, int(cfg.num_proc))
    if num_proc > 1:
        # fork: workers start in milliseconds (spawn would re-import the training entry point, ~10 s);
        # each worker tokenizes single-threaded, the parallelism comes from the processes
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(num_proc, initializer=_worker_init, initargs=(str(directory / tk.TOKENIZER_FILE),))
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
        results = pool.imap(_encode_chunk, chunks)  # ordered, so shards are deterministic
    else:
        _worker_init(str(directory / tk.TOKENIZER_FILE))
        pool, results = None, map(_encode_chunk, chunks)
    try:
        for chunk in results:
            for is_val, ids, reason in chunk:
                tokens_by_reason[reason] = tokens_by_reason.get(reason, 0) + len(ids)
                if reason is not None:
                    continue
                split = "val" if is_val else "train"
                writers[split].write(ids)
                docs[split] += 1
                if is_val:
                    val_counts += np.bincount(ids, minlength=vocab)
            bar.update(len(chunk))
            bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
        if pool is not None:
            pool.close()
            pool.join()
    if docs["train"] == 0 or docs["val"] == 0:
        raise ValueError(
            f"the corpus gave {docs['train']} training and {docs['val']} validation documents; it needs both: "
            "add more documents or change data.val_fraction"
            + (" or loosen data.curation's thresholds (it removed "
               f"{len(curation.removed)} of {curation.documents_in} documents)." if curation is not None else ".")
        )
    meta = {
        "format": FORMAT_VERSION,
        "source": source_fingerprint(cfg),
        "tokenizer_hash": tk.tokenizer_hash(tok),
        "tokenizer_settings": _tokenizer_identity(cfg),
        "vocab_size": vocab,
        "special_ids": asdict(specials),
        "special_tokens": tk.recorded_special_tokens(directory, tok),  # (tokenizer helper) role -> token, id, added
        "dtype": dtype.name,
        "documents": docs,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "shards": {s: w.names for s, w in writers.items()},
        "val_unigram_entropy_nats": unigram_entropy(val_counts),
        "seconds": round(time.time() - t0, 2),
    }
    if curation is not None:
        # both splits counted together: curation runs before the train/val split (so it also removes
        # validation documents that duplicate training ones)
        report = build_report(curation, tokens_by_reason, asdict(cfg.curation))
        (tmp / "curation_report.json").write_text(json.dumps(report, indent=2))
        meta["curation"] = {"report": "curation_report.json", "documents": report["documents"],
                            "tokens": report["tokens"]}
        if progress:
            print(f"curation ({curation.seconds}s; report in {directory / 'shards' / 'curation_report.json'}):\n"
                  + format_report(report))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    meta = json.loads(json.dumps(meta))  # the same plain-JSON form a later reuse reads back
    final = directory / "shards"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if progress:
        print(f"prepared {docs['train']} train / {docs['val']} val documents -> {meta['tokens']['train']:,} / "
              f"{meta['tokens']['val']:,} tokens ({dtype.name}) in {meta['seconds']}s at {final}")
    return meta


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution: the loss of the best context-free model."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r")


def shard_token_count(path: Path, dtype: np.dtype) -> int:
    return os.path.getsize(path) // np.dtype(dtype).itemsize


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 50.0))
