"""Every ``data.num_proc`` mode writes the same bytes; in-process preparation (0) leaves the process safe to
fork (a forked child that tokenizes, DataLoader workers, fw-train), passes a reader's error on as it is, and
keeps its read-ahead bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from framework.data.config import DataConfig
from framework.data.prepare import prepare_data
from framework.data.threaded import background
from tests.test_prepare_tasks import REPO, tokenizer_file, write_corpus  # noqa: F401  (tokenizer_file: fixture)


def _cfg(corpus: Path, cache: Path, tokenizer: str, num_proc: int, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(corpus / "*.jsonl")], tokenizer_path=tokenizer, cache_dir=str(cache),
                      num_proc=num_proc, val_fraction=0.2, shard_tokens=900, prepare_chunk_bytes=1_500, **kw)


def _without_seconds(meta):
    if isinstance(meta, dict):
        return {k: _without_seconds(v) for k, v in meta.items() if k != "seconds"}
    return [_without_seconds(v) for v in meta] if isinstance(meta, list) else meta


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under shards/ (tokens, document index, validation counts, metas without their timings)."""
    out = {}
    for path in sorted((directory / "shards").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".json":
                data = json.dumps(_without_seconds(json.loads(data)), sort_keys=True).encode()
            out[str(path.relative_to(directory))] = data
    return out


def test_every_num_proc_writes_the_same_bytes(tmp_path, tokenizer_file):  # noqa: F811
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [70, 5, 130, 40])
    written = {}
    for num_proc in (1, 0, 3):
        prepared = prepare_data(_cfg(corpus, tmp_path / f"cache{num_proc}", tokenizer_file, num_proc), progress=False)
        written[num_proc] = _shard_bytes(prepared.directory)
    assert len(written[1]) > 6 and sum(name.endswith(".bin") for name in written[1]) > 4  # several shards per split
    assert written[0] == written[1]
    assert written[3] == written[1]


FORK_SCRIPT = """
import multiprocessing as mp, os, sys, torch
from framework.data.config import DataConfig
from framework.data.datamodule import PackedWindows
from framework.data.prepare import prepare_data
from framework.data import tokenizer as tk
corpus, cache, tok = sys.argv[1:4]
prepared = prepare_data(DataConfig(source="files", paths=[corpus + "/*.jsonl"], tokenizer_path=tok, cache_dir=cache,
                        num_proc=0, prepare_chunk_bytes=2_000), progress=False)
assert os.environ["TOKENIZERS_PARALLELISM"] == "false", os.environ["TOKENIZERS_PARALLELISM"]
tokenizer = tk.load_tokenizer(prepared.tokenizer_path)
def encode(n):  # a forked child that tokenizes: it would hang on the parent's (uncopied) Rust thread pool
    return sum(len(e.ids) for e in tokenizer.encode_batch(["the model reads tokens"] * n))
with mp.get_context("fork").Pool(2) as pool:
    assert pool.map(encode, [50, 60]) == [encode(50), encode(60)]
ds = PackedWindows(prepared.shards("train"), prepared.dtype, 32)
loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
print(sum(int(b.numel()) for b in loader), len(ds) * 32)
"""


def test_processes_forked_after_in_process_preparation_work(tmp_path, tokenizer_file):  # noqa: F811
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [200])
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(corpus), str(tmp_path / "cache"), tokenizer_file],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen, expected = map(int, proc.stdout.split())
    assert seen == expected > 0


def test_a_reader_error_is_raised_as_it_is(tmp_path, tokenizer_file):  # noqa: F811
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [40])
    with open(corpus / "part_000.jsonl", "a") as f:
        f.write("{not json\n")
    errors = {}
    for num_proc in (1, 0):
        with pytest.raises(Exception) as info:
            prepare_data(_cfg(corpus, tmp_path / f"cache{num_proc}", tokenizer_file, num_proc), progress=False)
        errors[num_proc] = (type(info.value), str(info.value))
    assert errors[0] == errors[1]
    assert [p.name for p in (tmp_path / "cache0").iterdir() if p.suffix != ".lock"] == []  # nothing half-made


def test_background_reads_a_bounded_distance_ahead_and_stops_when_closed():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    gen = background(items(), maxsize=3)
    assert next(gen) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 3 + 1  # the one taken, a full queue, one waiting to be put
    gen.close()
    assert threading.active_count() == before  # the producer thread has ended
    assert len(produced) < 10


@pytest.mark.slow  # one fw-train process: prepares (tokenizer + shards) and trains with forked DataLoader workers
def test_training_with_loader_workers_after_in_process_preparation(tmp_path):
    from tests.conftest import TINY

    overrides = [o for o in TINY if not o.startswith("data.num_proc=")]
    proc = subprocess.run([sys.executable, "-m", "framework", "train", *overrides, "data.num_proc=0",
                           "data.num_workers=2", "trainer.max_steps=3", f"data.cache_dir={tmp_path / 'cache'}",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "cache").glob("*/shards/meta.json"))  # prepared here, not reused
