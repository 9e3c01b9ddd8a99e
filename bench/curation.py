"""Curation on two real corpora: what each stage removes (documents and characters) and how long it takes.

    python3 -m bench.curation                      # the embedded stdlib corpus and /usr/share/doc/*/copyright
    python3 -m bench.curation --min-words 20       # any CurationConfig threshold can be overridden this way
    python3 -m bench.curation --dedup-only         # quality filters off: what exact and near dedup find alone

The Debian copyright files (one per installed package, much repeated licence text) are read directly, since
the ``files`` source only takes known suffixes; they are a good deduplication demonstration.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import time

from framework.data.curation import STAGES, CurationConfig, curate
from framework.data.embedded import stdlib_documents


def copyright_documents(pattern: str = "/usr/share/doc/*/copyright") -> list[tuple[str, str]]:
    docs = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append((path, f.read()))
    return docs


def table(name: str, docs: list[tuple[str, str]], cfg: CurationConfig) -> None:
    t0 = time.time()
    result = curate(docs, cfg)
    seconds = time.time() - t0
    chars = [len(text) for _, text in docs]
    total_chars = sum(chars)
    by_stage = {stage: [0, 0] for stage in STAGES}
    for position, reason in result.removed.items():
        by_stage[reason][0] += 1
        by_stage[reason][1] += chars[position]
    print(f"\n{name}: {len(docs):,} documents, {total_chars / 1e6:.2f} M characters, curated in {seconds:.1f} s "
          f"({len(docs) / seconds:,.0f} documents/s)")
    print(f"| {'stage':<26} | {'documents':>9} | {'%':>6} | {'characters':>11} | {'%':>6} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 8}|{'-' * 13}|{'-' * 8}|")
    kept_docs, kept_chars = len(docs), total_chars
    for stage, (n, c) in by_stage.items():
        if n:
            print(f"| {stage:<26} | {n:>9,} | {100 * n / len(docs):>6.2f} | {c:>11,} | {100 * c / total_chars:>6.2f} |")
            kept_docs, kept_chars = kept_docs - n, kept_chars - c
    print(f"| {'kept':<26} | {kept_docs:>9,} | {100 * kept_docs / len(docs):>6.2f} | {kept_chars:>11,} | "
          f"{100 * kept_chars / total_chars:>6.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(CurationConfig):
        if f.name.startswith(("min_", "max_")) and "ngram" not in f.name:
            parser.add_argument("--" + f.name.replace("_", "-"), type=float)
    parser.add_argument("--dedup-only", action="store_true", help="turn every quality filter off")
    args = parser.parse_args()
    dedup_only = vars(args).pop("dedup_only")
    overrides = {k: (int(v) if k.endswith(("_words",)) else v) for k, v in vars(args).items() if v is not None}
    if dedup_only:
        overrides = {f.name: None for f in dataclasses.fields(CurationConfig) if f.name.startswith(("min_", "max_"))}
    cfg = CurationConfig(enabled=True, **overrides)
    table("stdlib docstrings + pydoc topics", list(stdlib_documents(40)), cfg)
    table("Debian copyright files", copyright_documents(), cfg)


if __name__ == "__main__":
    main()
