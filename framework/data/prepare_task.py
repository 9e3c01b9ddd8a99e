"""One preparation task: tokenize a contiguous share of the corpus into its own shards (``framework.data.shards``).

Pipeline: documents are read and grouped into chunks of about ``data.prepare_chunk_bytes`` characters; each
chunk is encoded with the tokenizer's ``encode_batch_fast`` and turned into two flat arrays in the shard dtype
(train and validation tokens, ``<eos>`` after each document) with the offsets of document starts
(``chunk_arrays``), which this process writes with one ``tofile`` per shard piece. Where the encoding runs is
``data.num_proc``:

- 0 (default): in this process, three threads overlapping (the tokenizer releases the GIL while it encodes): one
  reads, parses and chunks documents, one encodes with the tokenizer's Rust thread pool on every usable core,
  this one converts and writes (``framework.data.threaded``). ``TOKENIZERS_PARALLELISM`` is ``false`` after, so
  a process forked later (DataLoader workers) does not use the pool the fork did not copy;
- 1: in this process, single-threaded;
- N >= 2: N forked workers, each single-threaded, are sent chunks and return the arrays.

Memory is bounded by the chunk size, not by the corpus: at most ``READ_AHEAD + ENCODED_AHEAD`` chunks wait
between the threads (num_proc 0), at most ``2 * num_proc`` chunks are in flight to workers
(``multiprocessing.Pool.imap`` would read the whole input ahead of slow workers). Every mode writes the same bytes.

Validation rule: a document is held out when the stable hash of its id says so (``sources.is_validation``),
which does not depend on the task split. When that gives a task fewer than ``MIN_VAL_DOCUMENTS`` validation
documents (few, very long documents), the task also moves the last tokens of its training stream to
validation, so that validation holds ``data.val_fraction`` of the task's tokens.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from framework.data import tokenizer as tk
from framework.data.config import DataConfig
from framework.data.curation import CurationResult
from framework.data.shards import VAL_COUNTS, ShardWriter, commit_task, task_dir_name
from framework.data.sources import is_validation, iter_documents, task_progress_total
from framework.data.threaded import background, rust_thread_pool

MIN_VAL_DOCUMENTS = 4  # fewer hash-chosen validation documents in a task: the task's token tail joins validation
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker process
READ_AHEAD = 4  # in-process (num_proc 0): chunks read ahead of the encoder thread
ENCODED_AHEAD = 2  # in-process: encoded chunks waiting for the main thread

Chunk = list[tuple[str, str, "str | None"]]  # (doc_id, text, curation removal reason or None)


# ----------------------------------------------------------------------------- encoding a chunk
def encode_texts(tok, docs: Chunk) -> list:
    """The chunk's Encodings; ``encode_batch_fast`` skips the character offsets nothing here reads."""
    return getattr(tok, "encode_batch_fast", tok.encode_batch)([text for _, text, _ in docs], add_special_tokens=False)


def chunk_arrays(docs: Chunk, encodings: list, val_fraction: float, eos: int, dtype: np.dtype) -> dict:
    """A chunk of documents and their Encodings -> {"train"/"val": (tokens in the shard dtype, int64 document
    starts, documents), "reasons": {curation reason or None: tokens incl. <eos>}, "documents_in": documents}."""
    ids = [e.ids for e in encodings]  # each Encoding's ``ids`` builds a new Python list: read once per document
    for doc in ids:
        doc.append(eos)  # <eos> after every document
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(docs))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    kept = np.array([reason is None for _, _, reason in docs], dtype=bool)
    val = np.array([is_validation(doc_id, val_fraction) for doc_id, _, _ in docs], dtype=bool)
    reasons: dict[str | None, int] = {}
    for (_, _, reason), n in zip(docs, lengths.tolist()):
        reasons[reason] = reasons.get(reason, 0) + n
    out: dict = {"reasons": reasons, "documents_in": len(docs)}
    for split, select in (("train", kept & ~val), ("val", kept & val)):
        chosen = lengths[select]
        out[split] = (flat[np.repeat(select, lengths)], np.cumsum(chosen) - chosen, int(select.sum()))
    return out


# ----------------------------------------------------------------------------- worker processes (num_proc >= 2)
_worker: dict = {}


def _worker_init(tokenizer_path: str, val_fraction: float, eos: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=tk.load_tokenizer(tokenizer_path), val_fraction=val_fraction, eos=eos, dtype=np.dtype(dtype))


def encode_chunk(docs: Chunk) -> dict:
    """A chunk of documents -> its arrays (``chunk_arrays``), with the worker's tokenizer, single-threaded."""
    w = _worker
    return chunk_arrays(docs, encode_texts(w["tok"], docs), w["val_fraction"], w["eos"], w["dtype"])


# ----------------------------------------------------------------------------- in this process (num_proc 0)
def _encoded_in_threads(chunks: Iterator[tuple[Chunk, int]], init_args: tuple) -> Iterator[tuple[dict, int]]:
    """Encoded chunks in input order: a thread reads, a thread encodes with the Rust thread pool, this thread
    converts; at most ``READ_AHEAD + ENCODED_AHEAD`` (+ one in each thread) chunks in memory."""
    tokenizer_path, val_fraction, eos, dtype = init_args
    tok, dtype = tk.load_tokenizer(tokenizer_path), np.dtype(dtype)
    with rust_thread_pool():
        read = background(chunks, READ_AHEAD, "prepare-read")
        encoded = background(((c, encode_texts(tok, c), n) for c, n in read), ENCODED_AHEAD, "prepare-encode")
        try:
            for chunk, encodings, chars in encoded:
                yield chunk_arrays(chunk, encodings, val_fraction, eos, dtype), chars
        finally:
            encoded.close()  # stops the encoder thread first: it is the one iterating ``read``
            read.close()


def _chunks(docs: Iterator[tuple[str, str]], curation: CurationResult | None, chunk_chars: int,
            ) -> Iterator[tuple[Chunk, int]]:
    """(chunk, characters in it); ``position`` counts the whole stream, as curation does."""
    buf: Chunk = []
    chars = 0
    for position, (doc_id, text) in enumerate(docs):
        # removed documents are tokenized too, so the curation report can count their tokens
        buf.append((doc_id, text, None if curation is None else curation.reason(position)))
        chars += len(text)
        if chars >= chunk_chars:
            yield buf, chars
            buf, chars = [], 0
    if buf:
        yield buf, chars


def _encoded(chunks: Iterator[tuple[Chunk, int]], init_args: tuple, num_proc: int) -> Iterator[tuple[dict, int]]:
    """Encoded chunks in input order: in this process with the Rust thread pool (``num_proc`` 0), here
    single-threaded (1), or in ``num_proc`` forked workers with at most ``IN_FLIGHT_PER_WORKER * num_proc`` in
    flight."""
    if num_proc == 0:
        yield from _encoded_in_threads(chunks, init_args)
        return
    if num_proc == 1:
        _worker_init(*init_args)
        for chunk, chars in chunks:
            yield encode_chunk(chunk), chars
        return
    # fork: workers start in milliseconds (spawn would re-import the training entry point, ~10 s)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before fork: a forked Rust thread pool deadlocks
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(num_proc, initializer=_worker_init, initargs=init_args)
    if previous is None:
        os.environ.pop("TOKENIZERS_PARALLELISM")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = previous
    pending: deque = deque()
    try:
        for chunk, chars in chunks:
            pending.append((pool.apply_async(encode_chunk, (chunk,)), chars))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                result, n = pending.popleft()
                yield result.get(), n
        while pending:
            result, n = pending.popleft()
            yield result.get(), n
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- one task
def run_task(cfg: DataConfig, directory: Path, tok, common: dict, task_index: int, num_tasks: int, progress: bool,
             curation: CurationResult | None = None) -> tuple[dict, dict]:
    """Tokenize task ``task_index`` of ``num_tasks`` into ``shards/task_<i>-of-<n>/``; returns its task meta and
    the tokens (incl. <eos>) per curation removal reason (None = kept), which the curation report counts.
    ``common``: the meta.json keys every task shares (tokenizer hash, vocabulary, ...), kept in the task meta."""
    shard_dir = directory / "shards"
    final = shard_dir / task_dir_name(task_index, num_tasks)
    tmp = shard_dir / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)
    writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    counts = np.zeros(vocab, dtype=np.int64)
    documents = {"train": 0, "val": 0}
    reasons: dict[str | None, int] = {}
    t0 = time.time()
    total, unit = task_progress_total(cfg, task_index, num_tasks)
    bar = tqdm(desc=f"tokenizing task {task_index}/{num_tasks}", total=total, unit=unit, unit_scale=True,
               disable=not progress, mininterval=2.0)
    init = (str(directory / tk.TOKENIZER_FILE), cfg.val_fraction, tk.special_ids(tok).eos, dtype.name)
    chunks = _chunks(iter_documents(cfg, task_index, num_tasks), curation, cfg.prepare_chunk_bytes)
    encoded = _encoded(chunks, init, int(cfg.num_proc))
    try:
        for out, chars in encoded:
            for reason, n in out["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
            for split in ("train", "val"):
                tokens, starts, n_docs = out[split]
                writers[split].write(tokens, starts)
                documents[split] += n_docs
            counts += np.bincount(out["val"][0], minlength=vocab)
            if unit == "B":  # characters read stand in for bytes; never past the files' size
                bar.update(min(chars, total - bar.n))
            else:
                bar.update(out["documents_in"])
            seconds = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{(writers['train'].tokens + writers['val'].tokens) / seconds:,.0f} tokens/s")
        if unit == "B":  # the JSON/markup around the text is read too: the input is done
            bar.update(total - bar.n)
    finally:
        encoded.close()  # stops the worker processes or threads, also when writing failed
        bar.close()
        for w in writers.values():
            w.close()
    val_rule = "documents"
    if documents["val"] < MIN_VAL_DOCUMENTS and writers["train"].tokens > 0:
        val_rule = "tokens"
        _move_training_tail(writers, counts, cfg.val_fraction)
    np.save(tmp / VAL_COUNTS, counts)
    meta = {"task_index": task_index, "num_tasks": num_tasks, "documents": documents,
            "tokens": {s: w.tokens for s, w in writers.items()}, "shards": {s: w.names for s, w in writers.items()},
            "val_rule": val_rule, "common": common, "seconds": round(time.time() - t0, 2)}
    commit_task(tmp, final, meta)
    if progress:
        print(f"task {task_index}/{num_tasks}: {documents['train']} train / {documents['val']} val documents -> "
              f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens in {meta['seconds']}s at {final}")
    return meta, reasons


def _move_training_tail(writers: dict[str, ShardWriter], val_counts: np.ndarray, val_fraction: float) -> None:
    """Too few validation documents: the last tokens of the training stream join validation, so that validation
    holds ``val_fraction`` of the task's tokens (at least one token stays in training)."""
    total = writers["train"].tokens + writers["val"].tokens
    take = min(max(math.ceil(val_fraction * total) - writers["val"].tokens, 0), writers["train"].tokens - 1)
    for tokens, starts in writers["train"].truncate_tail(take):
        writers["val"].write(tokens, starts)
        val_counts += np.bincount(tokens, minlength=len(val_counts))
    writers["val"].close()
