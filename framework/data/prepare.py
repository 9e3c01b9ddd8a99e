"""Tokenize a text source into packed, memory-mapped token shards, in one job or split into N tasks.

Layout under ``data.cache_dir``::

    <source>-<key>/                 key = hash(source fingerprint, tokenizer settings, curation config if on)
        tokenizer.json              byte-level BPE trained on the training split (or the given one, copied)
        tokenizer_settings.json
        shards/task_<i>-of-<n>/     task i's shards and their document index (``framework.data.shards``)
        shards/curation_report.json when data.curation.enabled: documents and tokens in, removed per filter, kept
        shards/meta.json            written last by the merge: its presence marks a complete preparation

One job (``prepare_data``, what training calls) is task 0 of 1 followed by the merge. A split job
(``fw-prepare --tokenizer-only``, then ``--task-index I --num-tasks N`` for every I, then ``--merge``; the
last task to finish also merges) gives the same token stream, since each task takes a contiguous share of
the documents. Preparation runs under a file lock, so every rank of a distributed job can call
``prepare_data``: the first builds, the others wait and reuse. Preparing the same data twice reuses the shards.
A split job that is not finished is refused, never tokenized by training.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
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
from framework.data.shards import format_task_list, merge_tasks, missing_tasks, task_dir_name, task_dirs
from framework.data.shards import unigram_entropy  # noqa: F401  (re-exported: callers import it from here)
from framework.data.sources import is_validation, iter_documents, source_fingerprint

FORMAT_VERSION = 3  # 3: file document ids relative to their data.paths entry (2: absolute; 1: no per-task dirs)


class PreparedView:
    """What training reads of prepared data (one source's ``PreparedData`` or the run's ``PreparedSources``): the
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


def prepared_directory(cfg: DataConfig) -> Path:
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be strictly between 0 and 1.")
    return Path(cfg.cache_dir).expanduser().resolve() / f"{cfg.source}-{data_key(cfg)}"


def _lock(directory: Path):
    return _file_lock(directory.parent / f".{directory.name}.lock")


def _load(directory: Path) -> PreparedData | None:
    meta_path = directory / "shards" / "meta.json"
    return PreparedData(directory, json.loads(meta_path.read_text())) if meta_path.exists() else None


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """The prepared data: reused when complete, merged when a split job's tasks are all done, refused when some
    are missing, else prepared here as one task (train or reuse the tokenizer, tokenize, merge)."""
    directory = prepared_directory(cfg)
    with _lock(directory):
        prepared = _load(directory) or _finished_split_job(directory)
        if prepared is not None:
            return prepared
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            for stale in (directory / "shards").glob(f"{task_dir_name(0, 1)}*"):  # a killed one-task run (we hold the lock)
                shutil.rmtree(stale)
            # one curation pass (when on); both passes below skip the documents it removes
            curation = curate(iter_documents(cfg), cfg.curation, progress) if cfg.curation.enabled else None
            tok = _tokenizer(cfg, directory, progress, curation)
            from framework.data.prepare_task import run_task

            _, tokens_by_reason = run_task(cfg, directory, tok, _common_meta(cfg, tok, directory), 0, 1, progress,
                                           curation)
            extra = {}
            if curation is not None:
                extra["curation"] = _write_curation_report(directory, curation, tokens_by_reason, cfg, progress)
            return _merge(directory, 1, extra, progress)
        except Exception:  # an unreachable hub dataset, a bad JSON line: leave no half-made directory behind
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            raise


def _finished_split_job(directory: Path) -> PreparedData | None:
    """A split job's tasks all done but not yet merged: merge them (metadata only). Some missing: refuse."""
    jobs = {n: tasks for n, tasks in task_dirs(directory / "shards").items() if n > 1}
    for num_tasks in sorted(jobs, key=lambda n: -sum(d is not None for d in jobs[n].values())):
        missing = missing_tasks(directory / "shards", num_tasks)
        if missing:
            raise ValueError(
                f"the data at {directory} is only partially prepared: task(s) {format_task_list(missing)} of "
                f"{num_tasks} are missing; run `fw-prepare --task-index I --num-tasks {num_tasks}` with the same "
                "overrides for each before training (training does not tokenize a split job's data).")
        return _merge(directory, num_tasks)
    return None


def _common_meta(cfg: DataConfig, tok, directory: Path) -> dict:
    """The meta.json keys every task shares (the merge adds counts, shard lists and the document index)."""
    vocab = tok.get_vocab_size()
    return {
        "format": FORMAT_VERSION,
        "source": source_fingerprint(cfg),
        "tokenizer_hash": tk.tokenizer_hash(tok),
        "tokenizer_settings": _tokenizer_identity(cfg),
        "vocab_size": vocab,
        "special_ids": asdict(tk.special_ids(tok)),
        "special_tokens": tk.recorded_special_tokens(directory, tok),  # role -> token, id, added (bring your own)
        "dtype": np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32).name,
    }


def _merge(directory: Path, num_tasks: int, extra: dict | None = None, progress: bool = False) -> PreparedData:
    """Write ``shards/meta.json`` from the tasks' metas; stale tmp dirs of killed tasks are removed."""
    meta = merge_tasks(directory / "shards", num_tasks, extra or {})
    for stale in (directory / "shards").glob("task_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if progress:
        print(f"prepared {meta['documents']['train']} train / {meta['documents']['val']} val documents -> "
              f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens ({meta['dtype']}) from {num_tasks} "
              f"task(s) in {meta['seconds']}s of task time at {directory / 'shards'}")
    return PreparedData(directory, meta)


def prepare_tokenizer(cfg: DataConfig, progress: bool = True) -> Path:
    """Step 1 of a split job: the one tokenizer every task will use (trained, or ``data.tokenizer_path`` copied)."""
    directory = prepared_directory(cfg)
    with _lock(directory):
        directory.mkdir(parents=True, exist_ok=True)
        curation = curate(iter_documents(cfg), cfg.curation, progress) if cfg.curation.enabled else None
        _tokenizer(cfg, directory, progress, curation)
    return directory / tk.TOKENIZER_FILE


def prepare_task(cfg: DataConfig, task_index: int, num_tasks: int, progress: bool = True) -> PreparedData | None:
    """Step 2 of a split job: tokenize task ``task_index`` of ``num_tasks`` (skipped when already done); the task
    that finds every task done merges. Returns the prepared data once merged, else None."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} is out of range for --num-tasks {num_tasks}; "
                         f"use 0..{num_tasks - 1} (and --num-tasks >= 1).")
    if cfg.curation.enabled and num_tasks > 1:
        raise ValueError("data.curation removes duplicates across the whole corpus, which a task does not see; "
                         "prepare curated data as one task (--num-tasks 1 or plain fw-prepare).")
    directory = prepared_directory(cfg)
    done = _load(directory)
    if done is not None:
        return done
    if cfg.tokenizer_path:
        with _lock(directory):
            directory.mkdir(parents=True, exist_ok=True)
            tok = _tokenizer(cfg, directory, progress)
    elif (directory / tk.TOKENIZER_FILE).exists():
        tok = tk.load_tokenizer(directory / tk.TOKENIZER_FILE)
    else:
        raise ValueError(f"no tokenizer at {directory / tk.TOKENIZER_FILE}: all tasks must use one tokenizer, so "
                         "create it first with `fw-prepare --tokenizer-only` (same overrides) or set data.tokenizer_path.")
    if task_index in missing_tasks(directory / "shards", num_tasks):
        from framework.data.prepare_task import run_task

        run_task(cfg, directory, tok, _common_meta(cfg, tok, directory), task_index, num_tasks, progress)
    elif progress:
        print(f"task {task_index}/{num_tasks} is already done at {directory / 'shards' / task_dir_name(task_index, num_tasks)}")
    with _lock(directory):
        if _load(directory) is None and not missing_tasks(directory / "shards", num_tasks):
            return _merge(directory, num_tasks, progress=progress)  # the last task to finish merges
    return _load(directory)


def merge_prepared(cfg: DataConfig, num_tasks: int, progress: bool = True) -> PreparedData:
    """Step 3 of a split job: ``shards/meta.json`` from the tasks' metas (no token is copied)."""
    directory = prepared_directory(cfg)
    with _lock(directory):
        done = _load(directory)
        if done is not None and done.meta.get("num_tasks") == num_tasks:
            return done
        return _merge(directory, num_tasks, progress=progress)


def _write_curation_report(directory: Path, curation: CurationResult, tokens_by_reason: dict, cfg: DataConfig,
                           progress: bool) -> dict:
    # both splits counted together: curation runs before the train/val split (so it also removes
    # validation documents that duplicate training ones)
    report = build_report(curation, tokens_by_reason, asdict(cfg.curation))
    path = directory / "shards" / "curation_report.json"
    path.write_text(json.dumps(report, indent=2))
    if progress:
        print(f"curation ({curation.seconds}s; report in {path}):\n" + format_report(report))
    return {"report": "curation_report.json", "documents": report["documents"], "tokens": report["tokens"]}


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


def open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # mmap refuses an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def shard_token_count(path: Path, dtype: np.dtype) -> int:
    return os.path.getsize(path) // np.dtype(dtype).itemsize


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 50.0))
