"""Corpora as users have them: one big text file, compressed JSONL, save_to_disk and Parquet directories,
files that are not UTF-8 text, and the errors a user can cause. Text: the licences every Debian/Ubuntu system
ships (real prose nobody here wrote)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from framework.data.config import DataConfig
from framework.data.prepare import open_tokens, prepare_data
from framework.data.readers import text_documents
from framework.data.sources import iter_documents
from framework.data.tokenizer import bounded_texts

LICENSES = Path("/usr/share/common-licenses")
DOCS = Path("/usr/share/doc")


def _real_text(min_bytes: int) -> str:
    """Licence texts and package copyright files, concatenated (blank lines between files) up to ``min_bytes``."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file()) if LICENSES.is_dir() else []
    files += sorted(p / "copyright" for p in DOCS.iterdir() if (p / "copyright").is_file()) if DOCS.is_dir() else []
    out, size = [], 0
    for path in files * 20:
        text = path.read_bytes().decode("utf-8", errors="ignore")
        out.append(text)
        size += len(text.encode("utf-8"))
        if size >= min_bytes:
            return "\n\n".join(out)
    pytest.skip("this machine has too little text under /usr/share/common-licenses and /usr/share/doc")


def test_text_documents_split_at_paragraphs_and_cut_long_runs():
    paragraphs = [f"paragraph {i} " + "word " * (i % 7 * 30) for i in range(60)]
    text = "\n\n".join(paragraphs) + "\n" + "x" * 2500 + " tail" * 300  # a long run without blank lines at the end
    docs = list(text_documents(io.StringIO(text), 1000))
    assert "".join(docs) == text  # nothing lost, nothing reordered
    assert all(len(d) <= 1000 for d in docs)
    for p in paragraphs:  # every paragraph that fits a document is inside one document
        if len(p) < 1000:
            assert any(p in d for d in docs), p[:20]
    long_run = [d for d in docs if "x" * 900 in d or "tail tail" in d]
    assert len(long_run) >= 3  # cut into pieces (at 1000 without whitespace, at a space otherwise)
    assert any(d.endswith(" ") for d in long_run)


@pytest.mark.slow
def test_one_5mb_text_file_trains_with_a_validation_split(tmp_path):
    big = tmp_path / "dump.txt"
    big.write_text(_real_text(5_000_000))
    cfg = DataConfig(source="files", paths=[str(big)], vocab_size=512, cache_dir=str(tmp_path / "cache"), num_proc=2)
    docs = list(iter_documents(cfg))
    assert len(docs) >= 5_000_000 // cfg.text_document_chars and all(len(t) <= cfg.text_document_chars for _, t in docs)
    prepared = prepare_data(cfg, progress=False)
    assert prepared.meta["documents"]["val"] >= 10 and prepared.meta["documents"]["train"] >= 400
    assert prepared.meta["tokens"]["val"] > 0.01 * prepared.meta["tokens"]["train"]


def _eos_split(prepared) -> list[tuple[int, ...]]:
    """Both splits' documents as token tuples (the shards cut at <eos>), sorted: the corpus regardless of split."""
    eos = prepared.special_ids().eos
    docs = []
    for split in ("train", "val"):
        stream = np.concatenate([open_tokens(p, prepared.dtype) for p in prepared.shards(split)])
        cuts = np.flatnonzero(stream == eos)
        docs += [tuple(d.tolist()) for d in np.split(stream, cuts + 1) if len(d)]
    return sorted(docs)


def test_compressed_jsonl_and_saved_datasets_give_the_same_tokens_as_jsonl(tmp_path):
    import datasets
    import zstandard

    paragraphs = [p for p in _real_text(600_000).split("\n\n") if len(p.strip()) >= 200][:400]
    rows = [{"text": p, "n": i} for i, p in enumerate(paragraphs)]
    plain = tmp_path / "c" / "corpus.jsonl"
    plain.parent.mkdir()
    raw = "\n".join(json.dumps(r) for r in rows).encode()
    plain.write_bytes(raw)
    base = DataConfig(source="files", paths=[str(plain)], vocab_size=512, cache_dir=str(tmp_path / "cache"), num_proc=1)
    reference = prepare_data(base, progress=False)
    given = replace(base, tokenizer_path=str(reference.tokenizer_path))  # the same ids for every container
    writers = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress, ".bz2": bz2.compress,
               ".xz": lzma.compress}
    for suffix, compress in writers.items():  # beside the plain file: the same ids, so the same split and shards
        packed = plain.with_name(f"corpus.jsonl{suffix}")
        packed.write_bytes(compress(raw))
        prepared = prepare_data(replace(given, paths=[str(packed)]), progress=False)
        for split in ("train", "val"):
            assert [open_tokens(p, prepared.dtype).tolist() for p in prepared.shards(split)] == \
                   [open_tokens(p, reference.dtype).tolist() for p in reference.shards(split)], suffix
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "pq").mkdir()
    ds.select(range(200)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    ds.select(range(200, len(ds))).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))
    expected = _eos_split(reference)
    for cfg in (replace(given, paths=[str(tmp_path / "saved")]), replace(given, paths=[str(tmp_path / "saved_dict")]),
                replace(given, paths=[str(tmp_path / "pq")]),
                replace(given, source="hub", hub_name=str(tmp_path / "saved")),
                replace(given, source="hub", hub_name=str(tmp_path / "pq"))):
        assert _eos_split(prepare_data(cfg, progress=False)) == expected, (cfg.source, cfg.paths, cfg.hub_name)


def test_binary_and_latin1_files_are_skipped_with_one_warning(tmp_path):
    good = _real_text(50_000)
    for i in range(3):
        (tmp_path / f"good{i}.txt").write_text(good[i * 10_000:(i + 1) * 10_000])
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 40)  # NUL bytes: binary
    latin = ("Le présent contrat régit l'utilisation du logiciel ; la société décline toute responsabilité. " * 50)
    (tmp_path / "contrat.txt").write_bytes(latin.encode("latin-1"))  # é, è as single bytes: not UTF-8
    cfg = DataConfig(source="files", paths=[str(tmp_path)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = list(iter_documents(cfg))
        second = list(iter_documents(cfg))  # the corpus is read twice by preparation: still one warning
    messages = [str(w.message) for w in caught if "not UTF-8 text" in str(w.message)]
    assert len(messages) == 1
    size = (tmp_path / "image.txt").stat().st_size + (tmp_path / "contrat.txt").stat().st_size
    assert f"skipped 2 of 5 corpus files ({size:,} bytes)" in messages[0]
    assert "image.txt (binary)" in messages[0] and "contrat.txt (not UTF-8)" in messages[0]
    assert first == second and {Path(d.split(":", 1)[1].split("#")[0]).name for d, _ in first} == \
           {"good0.txt", "good1.txt", "good2.txt"}


def test_corpus_errors_name_the_file_and_what_to_do(tmp_path):
    def docs(*paths):
        return list(iter_documents(DataConfig(source="files", paths=[str(p) for p in paths])))

    with pytest.raises(FileNotFoundError, match="matches no file"):
        docs(tmp_path / "nothing*.jsonl")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.txt is empty; remove it"):
        docs(tmp_path / "empty.txt")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"directory .*images holds no corpus files"):
        docs(tmp_path / "images")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine fine fine fine fine fine fine fine"}\n'
                                                          b'{"text": "broken\n'))
    with pytest.raises(ValueError, match=r"bad.jsonl.gz, line 2, is not valid JSON"):
        docs(tmp_path / "bad.jsonl.gz")


def test_the_tokenizer_is_trained_on_a_bounded_sample(tmp_path):
    """A word that appears only after the first tokenizer_train_bytes is not learnt as a token."""
    assert list(bounded_texts(["ab", "cd", "ef"], 3)) == ["ab", "cd"]  # the document crossing the bound is the last
    early = [{"text": "the licence grants permission to copy and modify " * 20} for _ in range(200)]
    late = [{"text": "zqxjvwkp " * 200} for _ in range(200)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in early + late))
    cfg = DataConfig(source="files", paths=[str(corpus)], vocab_size=512, cache_dir=str(tmp_path / "cache"),
                     num_proc=1)
    whole = prepare_data(cfg, progress=False).tokenizer()
    bounded = prepare_data(replace(cfg, tokenizer_train_bytes=100_000), progress=False).tokenizer()
    assert len(whole.encode(" zqxjvwkp").ids) == 1 and len(bounded.encode(" zqxjvwkp").ids) > 2
