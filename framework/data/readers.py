"""Corpus files as users have them: each file (or ``datasets`` directory) as a stream of texts.

Formats, by name: ``.txt``/``.md``/``.text`` (split into documents, ``text_documents``), ``.jsonl``/``.ndjson``
(one JSON object per line), ``.json`` (a list of objects), ``.parquet``, and a directory written by
``datasets``' ``save_to_disk`` (its Arrow files, read with pyarrow). Text and JSON may be compressed
(``.gz``, ``.bz2``, ``.xz``, ``.zst``) and are read as a stream: memory stays bounded by one document
(one JSON line, one row batch), not the file.

A text or JSON file that is not UTF-8 text is skipped, not trained on: judged on its first ``SNIFF_BYTES``
(after decompression), it is binary when they hold a NUL byte, and not UTF-8 when over ``MAX_REPLACED_SHARE``
of their characters fail to decode (a Latin-1 file with accents fails at every accented letter).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEXT = {".txt", ".md", ".text"}
JSONL = {".jsonl", ".ndjson"}
FORMATS = TEXT | JSONL | {".json", ".parquet", ".arrow"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}
SNIFF_BYTES = 1 << 16  # 64 KiB of (decompressed) content judged per file
MAX_REPLACED_SHARE = 0.01  # over 1% undecodable characters: not UTF-8 (a Latin-1 file, a legacy code page)


def split_name(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or ""): ``a.jsonl.gz`` -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    rest = suffixes[:-1] if compression else suffixes
    return (rest[-1] if rest else ""), compression


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def saved_dataset_files(path: Path, split: str = "train") -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory in row order (a DatasetDict: its ``split``)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ValueError(f"{path} is a saved DatasetDict with splits {splits} but no {split!r}; point "
                             f"data.paths at one of them, e.g. {path / splits[0]}." if splits else
                             f"{path} is a saved DatasetDict with no splits; save the dataset again.")
        path = path / split
    state = json.loads((path / "state.json").read_text())
    return [path / f["filename"] for f in state.get("_data_files", [])]


def open_binary(path: Path) -> BinaryIO:
    """The file's content as a byte stream, decompressed on the fly."""
    compression = split_name(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def open_text(path: Path) -> io.TextIOWrapper:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace", newline="")


def not_text_reason(path: Path) -> str | None:
    """Why a text/JSON file is not UTF-8 text ("binary", "not UTF-8", "unreadable .gz"), or None."""
    try:
        with open_binary(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as err:
        return f"unreadable {split_name(path)[1] or 'file'} ({type(err).__name__})"
    if b"\x00" in head:
        return "binary"
    text = head.decode("utf-8", errors="replace")
    if len(head) == SNIFF_BYTES:  # a character cut at the end of the sample is not an error
        text = text[:-3]
    if text and text.count("\ufffd") > MAX_REPLACED_SHARE * len(text):
        return "not UTF-8"
    return None


def text_documents(f: io.TextIOBase, max_chars: int) -> Iterator[str]:
    """Documents of a plain-text stream: blank-line-separated paragraphs, grouped in order into documents of at
    most ``max_chars`` characters; a paragraph longer than that (text without blank lines) is cut into pieces
    of ``max_chars`` at the last whitespace in their second half (at ``max_chars`` if there is none).
    The documents, joined, are the text unchanged."""
    doc: list[str] = []  # lines of the paragraphs (and blank lines) closed so far
    size = 0
    para: list[str] = []
    psize = 0
    for line in iter(lambda: f.readline(max_chars), ""):
        if line.strip():  # part of a paragraph
            para.append(line)
            psize += len(line)
            if psize >= max_chars:  # no blank line in sight: fixed-size pieces
                if doc:
                    yield "".join(doc)
                    doc, size = [], 0
                text = "".join(para)
                while len(text) >= max_chars:
                    cut = max(text.rfind(" ", max_chars // 2, max_chars), text.rfind("\n", max_chars // 2, max_chars))
                    cut = cut + 1 if cut > 0 else max_chars
                    yield text[:cut]
                    text = text[cut:]
                para, psize = ([text], len(text)) if text else ([], 0)
            continue
        if para:  # a blank line closes the paragraph: it joins the document, or starts the next one
            if size + psize > max_chars and doc:
                yield "".join(doc)
                doc, size = [], 0
            doc += para
            size += psize
            para, psize = [], 0
        if size + len(line) > max_chars and doc:  # a blank line past the limit starts the next document
            yield "".join(doc)
            doc, size = [], 0
        doc.append(line)
        size += len(line)
    if para and size + psize > max_chars and doc:
        yield "".join(doc)
        doc, size = [], 0
    doc += para
    if "".join(doc).strip():
        yield "".join(doc)


def json_rows(path: Path) -> Iterator[dict]:
    """Objects of a JSONL file (one per line; blank lines skipped) or of a JSON file holding a list."""
    fmt = split_name(path)[0]
    with open_text(path) as f:
        if fmt == ".json":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); a .json corpus file "
                                 "holds one list of objects, or use JSONL (one object per line).") from None
            if not isinstance(rows, list):
                raise ValueError(f"{path} holds a JSON {type(rows).__name__}, not a list of objects; write the "
                                 "documents as a list, or as JSONL (one object per line).")
            yield from rows
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}, is not valid JSON ({err.msg}); fix or remove that line "
                                 "(JSONL holds one JSON object per line).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}, holds a JSON {type(row).__name__}, not an object with a "
                                 "text field; write one object per line, e.g. {\"text\": \"...\"}.")
            yield row


def _column(names: list[str], text_field: str, where: Path) -> None:
    if text_field not in names:
        raise ValueError(f"{where} has no column {text_field!r} (it has {names[:8]}); set data.text_field to the "
                         "text column's name.")


def parquet_texts(path: Path, text_field: str) -> Iterator[str | None]:
    """The text column of a Parquet file, in row batches (memory: one batch)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _column(pf.schema_arrow.names, text_field, path)
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from batch.column(0).to_pylist()


def arrow_texts(path: Path, text_field: str) -> Iterator[str | None]:
    """The text column of an Arrow stream file as ``save_to_disk`` writes it (memory-mapped, batch by batch)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        _column(reader.schema.names, text_field, path)
        for batch in reader:
            yield from batch.column(text_field).to_pylist()
