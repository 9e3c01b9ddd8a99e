"""Text sources: the embedded corpora (``framework.data.embedded``), local files, and ``datasets`` hub datasets.

Every source yields ``(doc_id, text)`` pairs in a deterministic order. The train/validation split is
made per document by a stable hash of ``doc_id`` (``is_validation``), so it does not depend on order,
on the number of processes, or on Python's per-process string-hash seed.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from framework.data import readers
from framework.data.config import DataConfig
from framework.data.embedded import (LICENSE_MAX_CHARS, Document, license_documents, license_fingerprint,
                                     stdlib_document_count, stdlib_documents)


def is_validation(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < int(round(val_fraction * 1_000_000))


# --------------------------------------------------------------------------- local files
CorpusFile = tuple[Path, str]  # a corpus file and its name in document ids (``_corpus_name``)


def _entry_root(pattern: str) -> Path:
    """What a ``data.paths`` entry's file names are relative to: the part before the first glob character; a
    directory itself; a file's parent."""
    parts = Path(pattern).parts
    if any(glob.has_magic(part) for part in parts):
        return Path(*itertools.takewhile(lambda part: not glob.has_magic(part), parts) or ["."])
    return Path(pattern) if Path(pattern).is_dir() else Path(pattern).parent


def _corpus_name(path: Path, root: Path) -> str:
    """``path`` relative to its entry's root, without a compression suffix: document ids, and so the split, do
    not depend on where the corpus lives (a moved or remounted corpus, pytest's temporary directories), and a
    corpus and its .gz have the same ids."""
    name = Path(os.path.relpath(path, root)).as_posix()
    compression = readers.split_name(path)[1]
    return name[: -len(compression)] if compression else name


def _expand(paths: list[str]) -> list[CorpusFile]:
    """Every corpus file the patterns name, in order: a pattern's matches sorted; a directory's files sorted (only
    those of a known format, ``readers.FORMATS`` possibly compressed; a ``save_to_disk`` directory: its Arrow
    files in row order); each with its name relative to the entry (``_corpus_name``)."""
    out: list[CorpusFile] = []
    for pattern in paths:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(
                f"data.paths entry {pattern!r} matches no file; give existing .txt/.md/.jsonl/.json/.parquet files "
                "(.gz/.zst/.bz2/.xz allowed), directories of them, or globs."
            )
        root = _entry_root(pattern)
        for m in matches:
            p = Path(m)
            if readers.is_saved_dataset(p):
                found = list(readers.saved_dataset_files(p))
            elif p.is_dir():
                found = sorted(q for q in p.rglob("*") if q.is_file() and readers.split_name(q)[0] in readers.FORMATS
                               and not q.name.startswith("."))
                if not found:
                    raise ValueError(f"directory {p} holds no corpus files (.txt, .md, .jsonl, .json, .parquet, "
                                     "optionally .gz/.zst/.bz2/.xz, or a datasets save_to_disk directory); "
                                     "point data.paths at the files.")
            else:
                found = [p]
            out.extend((q, _corpus_name(q, root)) for q in found)
    return out


def _readable(files: list[CorpusFile]) -> list[CorpusFile]:
    """``files`` without the ones that are not UTF-8 text, which are named in one warning that counts them."""
    keep, skipped = [], []
    for path, name in files:
        fmt = readers.split_name(path)[0]
        if fmt not in readers.FORMATS:
            raise ValueError(f"cannot read {path}: data files must be .txt, .md, .jsonl, .json, .parquet "
                             "(text and JSON optionally .gz/.zst/.bz2/.xz) or a datasets save_to_disk directory.")
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty; remove it from data.paths (or its directory).")
        reason = readers.not_text_reason(path) if fmt in readers.TEXT | readers.JSONL | {".json"} else None
        (keep if reason is None else skipped).append((path, name, reason))
    if skipped:
        size = sum(p.stat().st_size for p, _, _ in skipped)
        names = ", ".join(f"{p} ({why})" for p, _, why in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        message = (f"skipped {len(skipped)} of {len(files)} corpus files ({size:,} bytes) that are not UTF-8 text: "
                   f"{names}; convert them to UTF-8 (e.g. iconv -f latin1 -t utf-8) to train on them")
        if message not in _WARNED:  # once per process: the corpus is read twice (tokenizer, shards)
            _WARNED.add(message)
            warnings.warn(message, stacklevel=2)
    if not keep:
        raise ValueError(f"none of the {len(files)} files in data.paths is UTF-8 text (e.g. {files[0]}); "
                         "convert them to UTF-8.")
    return [(p, name) for p, name, _ in keep]


_WARNED: set[str] = set()


def file_documents(files: list[CorpusFile], text_field: str, min_chars: int,
                   text_document_chars: int) -> Iterator[Document]:
    """Documents of local files (``_expand``): a text file split into documents of at most ``text_document_chars``
    (``readers.text_documents``), a JSON(L) object or a Parquet/Arrow row one document each. Ids are
    ``file:<name>`` (a whole text file), ``file:<name>#<piece>`` or ``file:<name>:<row>``."""
    for path, name in _readable(files):
        fmt = readers.split_name(path)[0]
        doc_id = f"file:{name}"
        if fmt in readers.TEXT:
            with readers.open_text(path) as f:
                pieces = readers.text_documents(f, text_document_chars)
                first = next(pieces, None)
                second = next(pieces, None)
                if second is None:  # the whole file is one document: its id is the file's
                    if first is not None and len(first) >= min_chars:
                        yield doc_id, first
                    continue
                for k, text in enumerate(itertools.chain([first, second], pieces)):
                    if len(text) >= min_chars:
                        yield f"{doc_id}#{k}", text
        elif fmt in readers.JSONL or fmt == ".json":
            for i, row in enumerate(readers.json_rows(path)):
                text = _field(row, text_field, path)
                if len(text) >= min_chars:
                    yield f"{doc_id}:{i}", text
        else:
            read = readers.parquet_texts if fmt == ".parquet" else readers.arrow_texts
            texts = read(path, text_field)
            for i, text in enumerate(texts):
                if text and len(text) >= min_chars:
                    yield f"{doc_id}:{i}", text


def _field(row: dict, text_field: str, where: Path) -> str:
    if text_field not in row:
        raise KeyError(f"{where}: a record has no field {text_field!r}; set data.text_field to the text column's name.")
    text = row[text_field] or ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} holds a {type(text).__name__}, not text; set data.text_field "
                         "to the text column's name.")
    return text


# --------------------------------------------------------------------------- datasets hub
def load_hub(name: str, config: str, split: str, streaming: bool):
    """A ``datasets`` hub name, or a local directory: one written by ``save_to_disk`` (``load_from_disk``) or a
    folder of Parquet/JSONL files (``load_dataset`` infers the format); one sentence when it cannot be loaded."""
    import datasets

    local = Path(name).expanduser()
    if readers.is_saved_dataset(local):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{local} is a saved DatasetDict with splits {list(ds)}; set data.hub_split to one.")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(str(local) if local.is_dir() else name, config or None, split=split,
                                     streaming=streaming)
    except (ConnectionError, FileNotFoundError) as err:  # offline, a typo, a private or missing dataset
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise ValueError(f"data.hub_name={name!r} cannot be loaded ({reason}); check the name and the network "
                         "(or HF_DATASETS_OFFLINE with a cached copy), or give a local save_to_disk or Parquet "
                         "directory.") from err


def hub_documents(name: str, config: str, split: str, streaming: bool, text_field: str, min_chars: int,
                  max_documents: int) -> Iterator[Document]:
    """The rows of ``load_hub``'s dataset, ids ``hub:<name>:<config>:<split>:<row>``."""
    prefix = _hub_prefix(name, config, split)
    for i, row in enumerate(load_hub(name, config, split, streaming)):
        if max_documents and i >= max_documents:
            break
        text = row.get(text_field) or ""
        if len(text) >= min_chars:
            yield f"{prefix}:{i}", text


def _hub_prefix(name: str, config: str, split: str) -> str:
    """``hub:<name>:<config>:<split>``; a local directory by its own name, not where it lives."""
    local = Path(name).expanduser()
    return f"hub:{local.name if local.exists() else name}:{config}:{split}"


# --------------------------------------------------------------------------- dispatch
def iter_documents(cfg: DataConfig, task_index: int = 0, num_tasks: int = 1) -> Iterator[Document]:
    """The source's documents, or task ``task_index`` of ``num_tasks``'s contiguous share of them: the tasks'
    streams, concatenated in task order, are the whole stream (``partition`` says how each source is cut)."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} is out of range for --num-tasks {num_tasks}; "
                         f"use 0..{num_tasks - 1}.")
    if num_tasks > 1:
        return _task_documents(cfg, task_index, num_tasks)
    if cfg.source == "stdlib":
        docs = stdlib_documents(cfg.min_document_chars)
    elif cfg.source == "licenses":
        docs = license_documents(cfg.min_document_chars)
    elif cfg.source == "files":
        if not cfg.paths:
            raise ValueError("data.source=files needs data.paths=[...] (text, JSONL or Parquet files).")
        docs = file_documents(_expand(list(cfg.paths)), cfg.text_field, cfg.min_document_chars,
                              cfg.text_document_chars)
    elif cfg.source == "hub":
        if not cfg.hub_name:
            raise ValueError("data.source=hub needs data.hub_name=<a datasets hub name>.")
        return hub_documents(cfg.hub_name, cfg.hub_config, cfg.hub_split, cfg.streaming, cfg.text_field,
                             cfg.min_document_chars, cfg.max_documents)
    else:
        raise ValueError(f"data.source={cfg.source!r} is not one of 'stdlib', 'licenses', 'files', 'hub'.")
    if cfg.max_documents:
        return (d for i, d in enumerate(docs) if i < cfg.max_documents)
    return docs


# --------------------------------------------------------------------------- split preparation
def contiguous_range(length: int, task_index: int, num_tasks: int) -> tuple[int, int]:
    """[start, end) of task ``task_index``: ``datasets.Dataset.shard(num_tasks, task_index, contiguous=True)``'s
    rows (the first ``length % num_tasks`` tasks get one more)."""
    div, mod = divmod(length, num_tasks)
    start = div * task_index + min(task_index, mod)
    return start, start + div + (1 if task_index < mod else 0)


def partition_files(files: list[Path], task_index: int, num_tasks: int) -> list[Path]:
    """Task ``task_index``'s contiguous range of the sorted file list, balanced by bytes: a file belongs to the
    task whose equal share of the total bytes holds the file's middle byte. A file is never split."""
    sizes = [p.stat().st_size for p in files]
    total, begin, mine = sum(sizes), 0, []
    for i, (path, size) in enumerate(zip(files, sizes)):
        middle = (begin + size / 2) / total if total else (i + 0.5) / len(files)
        if min(int(middle * num_tasks), num_tasks - 1) == task_index:
            mine.append(path)
        begin += size
    return mine


def task_files(cfg: DataConfig, task_index: int, num_tasks: int) -> list[CorpusFile]:
    if not cfg.paths:
        raise ValueError("data.source=files needs data.paths=[...] (text, JSONL or Parquet files).")
    files = _expand(list(cfg.paths))
    mine = set(partition_files([path for path, _ in files], task_index, num_tasks))
    return [(path, name) for path, name in files if path in mine]


def _task_documents(cfg: DataConfig, task_index: int, num_tasks: int) -> Iterator[Document]:
    if cfg.source == "files":
        if cfg.max_documents:
            raise ValueError("data.max_documents cannot be combined with --num-tasks > 1 for data.source=files (a task "
                             "cannot know how many documents the files before its own hold); drop it or use one task.")
        files = task_files(cfg, task_index, num_tasks)
        if not files:
            return iter(())
        return file_documents(files, cfg.text_field, cfg.min_document_chars, cfg.text_document_chars)
    if cfg.source == "hub":
        return _hub_task_documents(cfg, task_index, num_tasks)
    docs = list(iter_documents(cfg))  # the embedded sources: a few MB, their documents counted in memory
    start, end = contiguous_range(len(docs), task_index, num_tasks)
    return iter(docs[start:end])


def _hub_task_documents(cfg: DataConfig, task_index: int, num_tasks: int) -> Iterator[Document]:
    """The task's contiguous ``Dataset.shard``; document ids keep their row numbers in the whole split."""
    if not cfg.hub_name:
        raise ValueError("data.source=hub needs data.hub_name=<a datasets hub name>.")
    if cfg.streaming:
        raise ValueError("a streaming datasets source cannot be split into tasks (its length is unknown); set "
                         "data.streaming=false (downloaded once, memory-mapped) or use --num-tasks 1.")
    ds = load_hub(cfg.hub_name, cfg.hub_config, cfg.hub_split, streaming=False)
    if cfg.max_documents:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    start, end = contiguous_range(len(ds), task_index, num_tasks)
    shard = ds.shard(num_shards=num_tasks, index=task_index, contiguous=True)
    assert len(shard) == end - start, "datasets.Dataset.shard changed its contiguous split"
    prefix = _hub_prefix(cfg.hub_name, cfg.hub_config, cfg.hub_split)
    for i, row in enumerate(shard, start=start):
        text = row.get(cfg.text_field) or ""
        if len(text) >= cfg.min_document_chars:
            yield f"{prefix}:{i}", text


def task_progress_total(cfg: DataConfig, task_index: int, num_tasks: int) -> tuple[int | None, str]:
    """What a task's progress bar counts: input bytes (files) or documents, and the total when knowable."""
    if cfg.source == "files":
        return sum(p.stat().st_size for p, _ in task_files(cfg, task_index, num_tasks)), "B"
    if cfg.source in ("stdlib", "licenses"):
        n = len(list(iter_documents(cfg))) if cfg.source == "licenses" else stdlib_document_count(cfg.min_document_chars)
        n = min(n, cfg.max_documents) if cfg.max_documents else n
        start, end = contiguous_range(n, task_index, num_tasks)
        return end - start, "doc"
    return None, "doc"


def source_fingerprint(cfg: DataConfig) -> dict:
    """What identifies the raw text, so prepared data is reused only for the same corpus."""
    fp: dict = {"source": cfg.source, "max_documents": cfg.max_documents, "min_document_chars": cfg.min_document_chars,
                "val_fraction": cfg.val_fraction}
    if cfg.source == "stdlib":
        fp["python"] = sys.version.split()[0]
        fp["stdlib"] = sysconfig.get_paths()["stdlib"]
    elif cfg.source == "licenses":
        fp["files"] = license_fingerprint()
        fp["max_chars"] = LICENSE_MAX_CHARS
    elif cfg.source == "files":
        fp["files"] = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p, _ in _expand(list(cfg.paths))]
        for path, size, _ in fp["files"]:  # refused before a cache directory exists (fw-prepare, fw-train)
            if size == 0:
                raise ValueError(f"{path} is empty; remove it from data.paths (or its directory).")
        fp["text_field"] = cfg.text_field
        fp["text_document_chars"] = cfg.text_document_chars  # how .txt files are split into documents
    elif cfg.source == "hub":
        fp.update(hub_name=cfg.hub_name, hub_config=cfg.hub_config, hub_split=cfg.hub_split, text_field=cfg.text_field)
    return fp
