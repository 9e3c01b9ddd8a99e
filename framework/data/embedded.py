"""The embedded corpora, on every machine without a download: the standard library's docstrings and pydoc's
topics (``data.source=stdlib``, the default) and the licence texts of a Debian/Ubuntu system
(``data.source=licenses``). Each yields ``(doc_id, text)`` in a fixed order; ids name the text, not the machine's
paths.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

Document = tuple[str, str]


# --------------------------------------------------------------------------- embedded corpus
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_documents(min_chars: int = 40) -> Iterator[Document]:
    """Iterate the embedded corpus (parsed once per process and kept: about 2 MB of text)."""
    return iter(_stdlib_documents(min_chars))


def stdlib_document_count(min_chars: int = 40) -> int:
    return len(_stdlib_documents(min_chars))


@functools.lru_cache(maxsize=2)
def _stdlib_documents(min_chars: int) -> tuple[Document, ...]:
    return tuple(_parse_stdlib(min_chars))


def _parse_stdlib(min_chars: int) -> Iterator[Document]:
    """Docstrings of every module, class and function in the standard library, then pydoc's topics.

    Parsed with ``ast`` (nothing is imported or executed). Real English technical prose, about
    1.8 MB on CPython 3.11, present on every machine that has Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts)))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    name = getattr(node, "name", "<module>")
                    yield f"stdlib:{rel}:{name}:{getattr(node, 'lineno', 0)}", doc
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for key in sorted(topics):
        if len(topics[key]) >= min_chars:
            yield f"pydoc:{key}", topics[key]


# --------------------------------------------------------------------------- embedded legal corpus
COMMON_LICENSES = "/usr/share/common-licenses"
PACKAGE_DOCS = "/usr/share/doc"


def _license_files(common_dir: str, doc_dir: str) -> list[Path]:
    """The full licence texts (sorted by name), then every package's ``copyright`` file (sorted by package)."""
    common, docs = Path(common_dir), Path(doc_dir)
    files = sorted(p for p in common.iterdir() if p.is_file()) if common.is_dir() else []
    if docs.is_dir():
        files += sorted(p / "copyright" for p in docs.iterdir() if (p / "copyright").is_file())
    if not files:
        raise FileNotFoundError(
            f"data.source=licenses reads {common_dir}/* and {doc_dir}/*/copyright, which this machine lacks: it needs "
            "a Debian/Ubuntu system's /usr/share/doc; use data.source=files 'data.paths=[<your legal texts>]' instead."
        )
    return files


LICENSE_MAX_CHARS = 500_000  # larger files are listings, not prose (see license_documents)


def license_documents(min_chars: int = 40, common_dir: str = COMMON_LICENSES,
                      doc_dir: str = PACKAGE_DOCS) -> Iterator[Document]:
    """The licence texts every Debian/Ubuntu system ships: a legal-English domain with no download.

    Document unit: one whole file. A ``copyright`` file is one legal instrument: its DEP-5 ``Files:`` stanzas
    name licences by short name (``License: GPL-2+``) that a later stand-alone ``License:`` stanza of the same
    file spells out, so the file, not the stanza, is the context a model should learn to use; about a third of
    the files are free text with no stanza structure at all; and splitting would put stanzas of one file on
    both sides of the train/validation split (it is drawn per document id). Byte-identical files (the symlinked
    ``GPL`` -> ``GPL-3``, and the one copyright file a source package installs for each of its binary
    packages: 752 copyright files, 391 distinct, on a Debian 12 machine; 404 documents, 3.6 MB in all) are
    yielded once, under the first path in the order below; near-duplicates (the GPL text quoted inside many
    files) are left to ``data.curation``.
    Ids: ``licenses:common-licenses/<name>`` and ``licenses:doc/<package>``.
    Files over ``LICENSE_MAX_CHARS`` are skipped: on Debian 12 that is one file, Boost's 2 MB per-file copyright
    listing (36% of the corpus on its own), which the per-document split drew into validation, leaving the
    validation split larger than the training split.
    """
    seen: set[bytes] = set()
    for path in _license_files(common_dir, doc_dir):
        raw = path.read_bytes()
        digest = hashlib.sha1(raw).digest()
        if digest in seen:
            continue
        seen.add(digest)
        text = raw.decode("utf-8", errors="replace")
        if min_chars <= len(text) <= LICENSE_MAX_CHARS:
            name = path.name if path.parent == Path(common_dir) else path.parent.name
            kind = "common-licenses" if path.parent == Path(common_dir) else "doc"
            yield f"licenses:{kind}/{name}", text


def license_fingerprint(common_dir: str = COMMON_LICENSES, doc_dir: str = PACKAGE_DOCS) -> list[tuple[str, int]]:
    """(path, size in bytes) of every file the source reads: installing or removing a package changes it."""
    return [(str(p), p.stat().st_size) for p in _license_files(common_dir, doc_dir)]
