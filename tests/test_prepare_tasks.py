"""Preparation as a split job: N tasks + a metadata-only merge give the one-job windows; the document index;
bad input (exit 2, one sentence, nothing half-written); training refuses a partially prepared directory;
memory that does not grow with the corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from framework.data import tokenizer as tk
from framework.data.config import DataConfig
from framework.data.datamodule import PackedWindows
from framework.data.prepare import (merge_prepared, open_tokens, prepare_data, prepare_task, prepare_tokenizer,
                                    prepared_directory)
from framework.data.shards import read_document_starts
from framework.data.sources import is_validation, iter_documents, partition_files

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the model reads tokens from shards and each task writes its own files while the merge only "
         "writes metadata so training never tokenizes anything again windows cross shard boundaries").split()


def write_corpus(directory: Path, file_docs: list[int], seed: int = 0, words_per_doc: tuple[int, int] = (20, 200),
                 ) -> list[Path]:
    """JSONL files holding ``file_docs[k]`` documents each of random words (sizes differ, so tasks are uneven)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, n in enumerate(file_docs):
        path = directory / f"part_{k:03d}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                text = " ".join(rng.choice(WORDS, size=int(rng.integers(*words_per_doc))))
                f.write(json.dumps({"text": f"{text}."}) + "\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tok")
    tk.save_tokenizer(tk.train_tokenizer([" ".join(WORDS)] * 50, 512), directory, {"test": True})
    return str(directory / tk.TOKENIZER_FILE)


def _cfg(corpus: Path, cache: Path, tokenizer: str = "", **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(corpus / "*.jsonl")], tokenizer_path=tokenizer, cache_dir=str(cache),
                      num_proc=kw.pop("num_proc", 1), val_fraction=kw.pop("val_fraction", 0.1),
                      shard_tokens=kw.pop("shard_tokens", 700), prepare_chunk_bytes=2_000, **kw)


def _windows(prepared, split: str, length: int) -> np.ndarray:
    ds = PackedWindows(prepared.shards(split), prepared.dtype, length)
    return np.stack([ds[i].numpy() for i in range(len(ds))])


def _stream(prepared, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(open_tokens(p, prepared.dtype)) for p in prepared.shards(split)])


def test_three_tasks_give_the_one_job_windows_in_the_same_order(tmp_path, tokenizer_file):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [60, 10, 120, 24, 80, 16])
    # val_fraction 0.2 of ~100 documents per task: every task gets enough validation documents for the
    # document rule (about 20; fewer than 4 has a probability below 1e-5 whatever the tmp path in the ids)
    one = prepare_data(_cfg(corpus, tmp_path / "one", tokenizer_file, val_fraction=0.2), progress=False)
    cfg = _cfg(corpus, tmp_path / "three", tokenizer_file, num_proc=2, val_fraction=0.2)
    assert prepare_task(cfg, 2, 3, progress=False) is None and prepare_task(cfg, 0, 3, progress=False) is None
    three = prepare_task(cfg, 1, 3, progress=False)  # the last task to finish merges
    assert three is not None and three.meta == merge_prepared(cfg, 3, progress=False).meta
    assert three.meta["num_tasks"] == 3 and {t["val_rule"] for t in three.meta["tasks"]} == {"documents"}
    task_dirs = [name.split("/")[0] for name in three.meta["shards"]["train"]]
    assert task_dirs == sorted(task_dirs) and set(task_dirs) == {f"task_0000{i}-of-00003" for i in range(3)}
    assert len(three.shards("train")) > 3  # several shards per task: windows cross shard and task boundaries
    for key in ("documents", "tokens", "val_unigram_entropy_nats", "tokenizer_hash", "dtype"):
        assert three.meta[key] == one.meta[key], key
    for split in ("train", "val"):
        assert np.array_equal(_windows(three, split, 37), _windows(one, split, 37))
        assert len(_windows(one, split, 37)) == one.meta["tokens"][split] // 37


def _document_starts(prepared, split: str) -> np.ndarray:
    """The split's document index as offsets into the concatenated split stream."""
    out, offset = [], 0
    for shard in prepared.shards(split):
        out.append(read_document_starts(shard) + offset)
        offset += len(open_tokens(shard, prepared.dtype))
    return np.concatenate(out)


def test_document_index_points_at_each_document_start(tmp_path, tokenizer_file):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [60, 90])
    prepared = prepare_data(_cfg(corpus, tmp_path / "c", tokenizer_file, val_fraction=0.2), progress=False)
    assert prepared.meta["tasks"][0]["val_rule"] == "documents"
    eos = prepared.special_ids().eos
    for split in ("train", "val"):
        stream = _stream(prepared, split)
        expected = np.concatenate([[0], np.flatnonzero(stream[:-1] == eos) + 1])  # the token after each <eos>
        assert np.array_equal(_document_starts(prepared, split), expected)
        assert len(expected) == prepared.meta["documents"][split]
    assert prepared.meta["document_index"]["suffix"] == ".docs"


def test_few_long_documents_take_validation_as_a_share_of_tokens(tmp_path, tokenizer_file):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [3], words_per_doc=(1500, 1600))
    cfg = _cfg(corpus, tmp_path / "c", tokenizer_file, val_fraction=0.05)
    path = corpus / "part_000.jsonl"
    for k in range(1, 100):  # ids hold the path: name the file so that the hash rule holds out none of the 3
        if not any(is_validation(doc_id, 0.05) for doc_id, _ in iter_documents(cfg)):
            break
        path = path.rename(corpus / f"part_{k:03d}.jsonl")
        cfg = replace(cfg, paths=[str(path)])
    prepared = prepare_data(cfg, progress=False)
    tokens = prepared.meta["tokens"]
    assert prepared.meta["tasks"][0]["val_rule"] == "tokens"
    assert tokens["val"] == pytest.approx(0.05 * (tokens["train"] + tokens["val"]), abs=1)
    # the validation split is the training stream's tail: together they are the documents in order
    eos = prepared.special_ids().eos
    whole = np.concatenate([_stream(prepared, "train"), _stream(prepared, "val")])
    assert (whole == eos).sum() == 3 and whole[-1] == eos
    starts = _document_starts(prepared, "val")
    assert starts[0] == 0  # the moved tail starts a segment of its own
    assert len(open_tokens(prepared.shards("train")[-1], prepared.dtype)) > 0  # no empty shard left behind


def test_files_are_split_into_contiguous_ranges_balanced_by_bytes(tmp_path):
    paths = []
    for k, size in enumerate([100, 100, 100, 700, 100, 100, 300]):
        paths.append(tmp_path / f"{k}.txt")
        paths[-1].write_text("x" * size)
    parts = [partition_files(paths, i, 3) for i in range(3)]
    assert sum(parts, []) == paths  # contiguous, in order, each file once
    assert [len(p) for p in parts] == [3, 1, 3]  # 300 / 700 / 500 bytes: the big file is a task of its own


def test_document_ids_do_not_depend_on_where_the_corpus_lives_or_the_task_split(tmp_path):
    """The split is a hash of document ids: the same corpus under two directories (as a directory entry, a glob
    and a .gz copy) has the same ids, and three tasks give the one-job ids, text pieces included."""
    import gzip
    import shutil

    for root in ("a/deep/place", "b"):
        write_corpus(tmp_path / root / "jsonl", [5, 7], seed=1)
        (tmp_path / root / "book.txt").write_text("\n\n".join(" ".join(WORDS[: 5 + k]) for k in range(40)))
    with open(tmp_path / "b" / "book.txt", "rb") as src, gzip.open(tmp_path / "b" / "book.txt.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (tmp_path / "b" / "book.txt").unlink()

    def ids(paths: list[str], num_tasks: int = 1) -> list[str]:
        cfg = DataConfig(source="files", paths=paths, text_document_chars=300, min_document_chars=1)
        return [doc_id for t in range(num_tasks) for doc_id, _ in iter_documents(cfg, t, num_tasks)]

    one_job = ids([str(tmp_path / "a/deep/place")])
    pieces = [i for i in one_job if i.startswith("file:book.txt#")]
    assert len(one_job) == 12 + len(pieces) and len(set(one_job)) == len(one_job) and len(pieces) > 10  # <= 300 chars
    assert "file:jsonl/part_001.jsonl:6" in one_job and "file:book.txt#10" in one_job
    assert ids([str(tmp_path / "b")]) == one_job  # moved, and the book gzipped
    assert ids([str(tmp_path / "a/deep/place/*")]) == one_job  # a glob's names start after its fixed part
    assert ids([str(tmp_path / "a/deep/place")], num_tasks=3) == one_job


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FRAMEWORK_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "framework", "prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_one_sentence(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow  # two CLI processes, each composing the training config (imports Lightning)
def test_bad_split_jobs_exit_2_with_one_sentence_and_write_nothing(tmp_path, tokenizer_file, compose):
    from framework.config import to_run_config

    corpus = tmp_path / "corpus"
    write_corpus(corpus, [20, 20, 20])
    cache = tmp_path / "cache"
    overrides = ["data.source=files", f"data.paths=[{corpus}/*.jsonl]", f"data.cache_dir={cache}"]
    _assert_one_sentence(_cli("--task-index", "5", "--num-tasks", "3", *overrides, cwd=tmp_path),
                         "--task-index 5 is out of range for --num-tasks 3")
    assert not cache.exists()
    cfg = to_run_config(compose(overrides, tiny=False)).data  # what the CLI composes from the same overrides
    with pytest.raises(ValueError, match="fw-prepare --tokenizer-only"):  # a task needs the shared tokenizer
        prepare_task(cfg, 0, 3, progress=False)
    assert not (prepared_directory(cfg) / "shards").exists()
    given = [*overrides, f"data.tokenizer_path={tokenizer_file}"]
    prepare_task(to_run_config(compose(given, tiny=False)).data, 1, 3, progress=False)
    _assert_one_sentence(_cli("--merge", "--num-tasks", "3", *given, cwd=tmp_path), "task(s) 0, 2 of 3")
    assert not (prepared_directory(cfg) / "shards" / "meta.json").exists()


def test_training_refuses_a_partially_prepared_directory(tmp_path, tokenizer_file, compose):
    from framework.config import to_run_config
    from framework.run import ConfigurationError, run

    corpus = tmp_path / "corpus"
    write_corpus(corpus, [20, 20])
    run_cfg = to_run_config(compose(["data.source=files", f"data.paths=[{corpus}/*.jsonl]",
                                     f"data.tokenizer_path={tokenizer_file}", f"data.cache_dir={tmp_path / 'c'}",
                                     "data.max_documents=0"]))
    prepare_tokenizer(run_cfg.data, progress=False)
    prepare_task(run_cfg.data, 0, 2, progress=False)
    with pytest.raises(ConfigurationError, match=r"partially prepared: task\(s\) 1 of 2 are missing"):
        run(run_cfg, tmp_path / "run")
    shards = prepared_directory(run_cfg.data) / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["task_00000-of-00002"]  # training tokenized nothing
    prepare_task(run_cfg.data, 1, 2, progress=False)
    assert prepare_data(run_cfg.data, progress=False).meta["num_tasks"] == 2


MEMORY_SCRIPT = """
import sys
from framework.data.config import DataConfig
from framework.data.prepare import prepare_data
corpus, cache, tok, num_proc = sys.argv[1:5]
prepare_data(DataConfig(source="files", paths=[corpus + "/*.jsonl"], tokenizer_path=tok, cache_dir=cache,
                        num_proc=int(num_proc), prepare_chunk_bytes=100_000, shard_tokens=200_000), progress=False)
"""
MEMORY_BOUND_MB = 12  # 4x the corpus adds 6 MB of text; a pipeline that held it (or read ahead) would add more


@pytest.mark.parametrize("num_proc", [0, 2])  # in-process threads; forked workers
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer_file, num_proc):
    sys.path.insert(0, str(REPO / "bench"))
    from prepare_speed import run_with_peak_rss

    peaks = {}
    for mb in (2, 8):
        corpus = tmp_path / f"corpus_{mb}"
        write_corpus(corpus, [int(mb * 1e6 / 700)] * 1, seed=mb)  # ~700 bytes per document
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        proc, peak, _ = run_with_peak_rss([sys.executable, "-c", MEMORY_SCRIPT, str(corpus), str(tmp_path / f"c{mb}"),
                                           tokenizer_file, str(num_proc)], env=env, interval_s=0.02)
        assert proc.returncode == 0, proc.stderr
        peaks[mb] = peak / 2**20
    assert peaks[8] - peaks[2] < MEMORY_BOUND_MB, peaks


FAKE = """#!/bin/bash
echo "$*" >> "{log}"
echo $(( $(wc -l < "{log}") + 100 ))
"""


def test_slurm_script_chains_tokenizer_tasks_and_merge(tmp_path):
    """The submission logic against a stand-in ``sbatch`` (records its arguments, prints a job id) and each
    stage's command line against a stand-in python (the real chain runs on a cluster)."""
    log, bin_dir = tmp_path / "sbatch.log", tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE.format(log=log)), ("python_stub", 'echo "$*"\n')):
        (bin_dir / name).write_text(body if body.startswith("#!") else "#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    script = str(REPO / "slurm" / "prepare_array.sbatch")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PREPARE_CPUS": "4",
           "PREPARE_SBATCH_ARGS": "--partition=cpu"}
    env.pop("FW_PREPARE_STAGE", None)
    out = subprocess.run(["bash", script, "3", "data.source=files", "data.paths=[/c/*.jsonl]"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "tokenizer job 101, task array 102 (0-2), merge job 103" in out
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all("--partition=cpu" in c and c.endswith("data.source=files data.paths=[/c/*.jsonl]")
                                   for c in calls)
    assert "FW_PREPARE_STAGE=tokenizer" in calls[0] and "--dependency" not in calls[0]
    assert "--array=0-2 --dependency=afterok:101" in calls[1] and "--cpus-per-task=4" in calls[1]
    assert "--dependency=afterok:102" in calls[2] and "FW_PREPARE_STAGE=merge,FW_PREPARE_NUM_TASKS=3" in calls[2]
    stage_env = {**env, "PYTHON": str(bin_dir / "python_stub"), "FW_PREPARE_NUM_TASKS": "3",
                 "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "4"}
    expected = {"tokenizer": "--tokenizer-only data.source=files",
                "task": "--task-index 2 --num-tasks 3 data.source=files data.num_proc=4",
                "merge": "--merge --num-tasks 3 data.source=files"}
    for stage, args in expected.items():
        line = subprocess.run(["bash", script, "data.source=files"], env={**stage_env, "FW_PREPARE_STAGE": stage},
                              capture_output=True, text=True, check=True).stdout.strip()
        assert line == f"-m framework prepare {args}"
    assert subprocess.run(["bash", script, "0"], env=env, capture_output=True).returncode == 2
