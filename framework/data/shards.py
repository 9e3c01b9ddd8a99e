"""Shard files, their document index, per-task metadata and the metadata-only merge of a split preparation.

One task's output, ``shards/task_<i>-of-<n>/`` (written as ``task_<i>-of-<n>.tmp-<pid>`` and renamed when
complete, so a killed task leaves nothing a later run picks up)::

    train_00000.bin    tokens, little-endian uint16 (vocab <= 65,536) or uint32, documents back to back, each
                       followed by <eos>; a document may continue into the next shard
    train_00000.docs   int64: the token offsets, within this shard, of the documents that start in it, ascending
    val_00000.bin/.docs
    val_counts.npy     int64 (vocab,): validation unigram counts (the merge sums them; O(vocab), not O(corpus))
    task_meta.json     written last, inside the tmp dir: documents, tokens, shards, validation rule

The merge (``merge_tasks``) reads the task metas and writes ``shards/meta.json``: it copies no tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

DOCS_SUFFIX = ".docs"
TASK_META = "task_meta.json"
VAL_COUNTS = "val_counts.npy"
_TASK_DIR = re.compile(r"^task_(\d{5})-of-(\d{5})(\.tmp-.*)?$")
TAIL_CHUNK_TOKENS = 1 << 22  # tokens moved per read when a task's validation split takes its training tail


def task_dir_name(task_index: int, num_tasks: int) -> str:
    return f"task_{task_index:05d}-of-{num_tasks:05d}"


def docs_path(shard: Path) -> Path:
    """The document index beside a shard: ``train_00000.bin`` -> ``train_00000.docs``."""
    return shard.with_suffix(DOCS_SUFFIX)


def read_document_starts(shard: Path) -> np.ndarray:
    """int64 token offsets, within ``shard``, of the documents that start in it."""
    return np.fromfile(docs_path(shard), dtype=np.int64)


class ShardWriter:
    """Appends tokens of one split to ``<split>_<k>.bin`` files of at most ``shard_tokens`` tokens each, and the
    offsets of document starts to the ``.docs`` file beside each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.names: list[str] = []
        self.sizes: list[int] = []  # tokens per shard
        self.tokens = 0
        self._bin = self._docs = None

    def write(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """``tokens`` (already in the shard dtype), ``starts``: int64 offsets into ``tokens`` of document starts."""
        pos = 0
        while pos < len(tokens):
            if self._bin is None or self.sizes[-1] >= self.shard_tokens:
                self._roll()
            take = min(len(tokens) - pos, self.shard_tokens - self.sizes[-1])
            tokens[pos : pos + take].tofile(self._bin)
            lo, hi = np.searchsorted(starts, [pos, pos + take])
            (starts[lo:hi] - pos + self.sizes[-1]).astype(np.int64).tofile(self._docs)
            self.sizes[-1] += take
            pos += take
        self.tokens += len(tokens)

    def _roll(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.names):05d}.bin"
        self.names.append(name)
        self.sizes.append(0)
        self._bin = open(self.directory / name, "wb")
        self._docs = open(docs_path(self.directory / name), "wb")

    def close(self) -> None:
        for f in (self._bin, self._docs):
            if f is not None:
                f.close()
        self._bin = self._docs = None

    def truncate_tail(self, num_tokens: int):
        """Remove the last ``num_tokens`` tokens; yields them first as (tokens, document starts) pieces in order
        (the first piece starts a new segment: offset 0 is always a start). Bounded memory: ``TAIL_CHUNK_TOKENS``."""
        self.close()
        cut = self.tokens - num_tokens
        first = True
        begin = 0
        for name, size in zip(list(self.names), list(self.sizes)):
            end = begin + size
            if end > cut:
                local = max(cut - begin, 0)
                path = self.directory / name
                tokens = np.memmap(path, dtype=self.dtype, mode="r")
                starts = read_document_starts(path)
                for a in range(local, size, TAIL_CHUNK_TOKENS):
                    b = min(a + TAIL_CHUNK_TOKENS, size)
                    piece_starts = starts[(starts >= a) & (starts < b)] - a
                    if first and (len(piece_starts) == 0 or piece_starts[0] != 0):
                        piece_starts = np.concatenate([[0], piece_starts]).astype(np.int64)
                    first = False
                    yield np.array(tokens[a:b]), piece_starts
                del tokens
                os.truncate(path, local * self.dtype.itemsize)
                starts[starts < local].tofile(docs_path(path))
            begin = end
        while self.sizes and self.sizes[-1] == 0:  # shards left empty are removed
            (self.directory / self.names[-1]).unlink()
            docs_path(self.directory / self.names.pop()).unlink()
            self.sizes.pop()
        if self.sizes:
            self.sizes[-1] = cut - sum(self.sizes[:-1])
        self.tokens = cut


# ----------------------------------------------------------------------------- tasks on disk
def task_dirs(shard_dir: Path) -> dict[int, dict[int, Path | None]]:
    """num_tasks -> {task_index: complete task dir, or None while only an unfinished (tmp) dir exists}."""
    found: dict[int, dict[int, Path | None]] = {}
    if not shard_dir.is_dir():
        return found
    for entry in shard_dir.iterdir():
        m = _TASK_DIR.match(entry.name)
        if not m:
            continue
        index, num = int(m.group(1)), int(m.group(2))
        complete = m.group(3) is None and (entry / TASK_META).exists()
        tasks = found.setdefault(num, {})
        if complete or index not in tasks:
            tasks[index] = entry if complete else tasks.get(index)
    return found


def missing_tasks(shard_dir: Path, num_tasks: int) -> list[int]:
    done = task_dirs(shard_dir).get(num_tasks, {})
    return [i for i in range(num_tasks) if done.get(i) is None]


def format_task_list(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def commit_task(tmp: Path, final: Path, task_meta: dict) -> bool:
    """Write the task meta last, then rename the task's tmp dir into place (atomic). False when another copy of
    the same task got there first (its output is kept, this one is dropped)."""
    (tmp / (TASK_META + ".tmp")).write_text(json.dumps(task_meta, indent=2))
    os.replace(tmp / (TASK_META + ".tmp"), tmp / TASK_META)
    try:
        tmp.rename(final)
    except OSError:
        if not (final / TASK_META).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def merge_tasks(shard_dir: Path, num_tasks: int, extra: dict) -> dict:
    """``shards/meta.json`` from the task metas (no tokens copied): the keys every task shares (``common`` in each
    task meta; tasks that disagree, e.g. tokenized with different tokenizers, are refused), the summed counts,
    the shard lists in task order, and ``extra``."""
    missing = missing_tasks(shard_dir, num_tasks)
    if missing:
        raise ValueError(
            f"cannot merge {shard_dir.parent}: task(s) {format_task_list(missing)} of {num_tasks} have not finished "
            f"(no {task_dir_name(missing[0], num_tasks)}/{TASK_META}); run each with `fw-prepare --task-index I "
            f"--num-tasks {num_tasks}` and the same overrides, then merge again.")
    metas, val_counts = [], None
    for i in range(num_tasks):
        task = shard_dir / task_dir_name(i, num_tasks)
        metas.append(json.loads((task / TASK_META).read_text()))
        counts = np.load(task / VAL_COUNTS)
        val_counts = counts if val_counts is None else val_counts + counts
    common = metas[0]["common"]
    differing = [i for i, m in enumerate(metas) if m["common"] != common]
    if differing:
        raise ValueError(f"task(s) {format_task_list(differing)} of {num_tasks} in {shard_dir} were prepared with a "
                         "different tokenizer or settings than task 0; delete them and run them again.")
    splits = ("train", "val")
    documents = {s: sum(m["documents"][s] for m in metas) for s in splits}
    tokens = {s: sum(m["tokens"][s] for m in metas) for s in splits}
    if tokens["train"] == 0 or tokens["val"] == 0:
        raise ValueError(f"the corpus gave {documents['train']} training and {documents['val']} validation documents "
                         f"({tokens['train']} / {tokens['val']} tokens); it needs both: add more documents or change "
                         "data.val_fraction.")
    meta = {
        **common,
        **extra,
        "documents": documents,
        "tokens": tokens,
        "shards": {s: [f"{task_dir_name(i, num_tasks)}/{n}" for i, m in enumerate(metas) for n in m["shards"][s]]
                   for s in splits},
        "num_tasks": num_tasks,
        "tasks": [{k: m[k] for k in ("documents", "tokens", "val_rule", "seconds")} for m in metas],
        "document_index": {"suffix": DOCS_SUFFIX, "dtype": "int64",
                           "offsets": "token offsets, within each shard, of the documents that start in it"},
        "val_unigram_entropy_nats": unigram_entropy(val_counts),
        "seconds": round(sum(m["seconds"] for m in metas), 2),
    }
    tmp = shard_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, shard_dir / "meta.json")  # written last: its presence marks a complete preparation
    return json.loads(json.dumps(meta))


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution: the loss of the best context-free model."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
