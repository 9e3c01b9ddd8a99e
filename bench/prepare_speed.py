"""Preparation throughput against the tokenizer's own ceiling, and peak memory, on growing corpora.

    python3 bench/prepare_speed.py --sizes-mb 10 100 1000 [--workdir DIR] [--num-proc N] [--chunk-bytes C]

Corpus: real text from this machine (``/usr/share/common-licenses``, every ``/usr/share/doc/*/copyright``,
the packages' changelogs, gunzipped, and the Python standard library's docstrings), cut into paragraphs;
documents of 1..20 paragraphs drawn with a seeded RNG, written as JSONL files of ``--file-mb`` each until the
size is reached. One byte-level BPE (``data.vocab_size`` 8192) is trained once on a 4 MB sample and given to
every run (``data.tokenizer_path``), so only tokenization is timed.

Per size:
- framework: ``fw-prepare`` (``python3 -m framework prepare``) in a subprocess, with the default
  ``data.num_proc`` and ``data.prepare_chunk_bytes`` unless ``--num-proc`` / ``--chunk-bytes`` are given; wall
  time includes process start and config composition, the task's own seconds (meta.json) do not;
- ceiling: in a fresh subprocess, the same tokenizer's ``encode_batch_fast`` (``encode_batch`` where absent) alone (``TOKENIZERS_PARALLELISM=true``:
  its Rust thread pool on the same cores) over the same documents in chunks of ``--ceiling-chunk-bytes``
  (4 MB: few synchronisation points, its best case), timing only the ``encode_batch`` calls (not reading or
  parsing the JSONL);
- with ``--repeats R`` both are measured R times, alternating, and each keeps its fastest run (the peak RSS is
  the largest of the framework's runs): on a shared machine the load changes between runs;
- ratio = ceiling seconds / framework task seconds (the same text; > 1 would be faster than the ceiling);
- peak RSS: the sum of the proportional resident set sizes (``Pss``) of the framework process and all its
  descendants, sampled every 50 ms (``resource.getrusage(RUSAGE_CHILDREN)`` gives only the largest single child,
  and summing ``VmRSS`` would count the pages forked workers share with their parent once per process).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- process-tree memory
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants now (0 once it has exited), as the sum of their
    proportional set sizes (``Pss`` in ``/proc/<pid>/smaps_rollup``): a page shared by k processes (forked
    workers share the parent's pages) counts 1/k in each, so the sum is the tree's memory, not k times it."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        stack += _children(p)
    return total


def run_with_peak_rss(cmd: list[str], env: dict | None = None, interval_s: float = 0.05,
                      timeout_s: float | None = None) -> tuple[subprocess.CompletedProcess, int, float]:
    """(completed process, peak tree RSS in bytes, wall seconds) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        done.set()
        sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak[0], time.perf_counter() - t0


# ----------------------------------------------------------------------------- corpus
def machine_paragraphs(max_chars: int = 60_000_000) -> list[str]:
    """Paragraphs (blank-line separated, >= 80 characters) of the text this machine ships."""
    texts: list[str] = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright")):
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    for path in sorted(Path("/usr/share/doc").glob("*/changelog*")):
        try:
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        texts.append(raw.decode("utf-8", errors="replace"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts += [d for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and (d := ast.get_docstring(n))]
    paragraphs, total = [], 0
    for text in texts:
        for p in text.split("\n\n"):
            if len(p.strip()) >= 80 and total < max_chars:
                paragraphs.append(p.strip())
                total += len(p)
    return paragraphs


def write_corpus(directory: Path, paragraphs: list[str], size_bytes: int, file_bytes: int, seed: int = 0) -> int:
    """JSONL files of documents made of 1..20 paragraphs drawn at random, ``size_bytes`` in all; documents."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = documents = index = 0
    while written < size_bytes:
        with open(directory / f"part_{index:05d}.jsonl", "w") as f:
            in_file = 0
            while in_file < file_bytes and written + in_file < size_bytes:
                doc = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 20)))
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                in_file += len(line.encode("utf-8"))
                documents += 1
        written += in_file
        index += 1
    return documents


def train_bench_tokenizer(paragraphs: list[str], path: Path, vocab_size: int = 8192) -> None:
    from framework.data import tokenizer as tk

    rng = random.Random(1)
    sample, chars = [], 0
    while chars < 4_000_000:
        sample.append(rng.choice(paragraphs))
        chars += len(sample[-1])
    tk.save_tokenizer(tk.train_tokenizer(sample, vocab_size), path.parent, {"bench": "prepare_speed"})


# ----------------------------------------------------------------------------- the two measurements
CEILING = r"""
import json, os, sys, time, glob
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1]); chunk_chars = int(sys.argv[3])
encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the fastest batch call, as the framework uses
seconds = tokens = 0.0
def flush(texts):
    global seconds, tokens
    t0 = time.perf_counter(); encodings = encode(texts, add_special_tokens=False)
    seconds += time.perf_counter() - t0; tokens += sum(len(e.ids) for e in encodings)
texts, chars = [], 0
for path in sorted(glob.glob(os.path.join(sys.argv[2], "*.jsonl"))):
    for line in open(path):
        texts.append(json.loads(line)["text"]); chars += len(texts[-1])
        if chars >= chunk_chars:
            flush(texts); texts, chars = [], 0
if texts:
    flush(texts)
print(json.dumps({"seconds": seconds, "tokens": tokens}))
"""


def measure_ceiling(tokenizer: Path, corpus: Path, chunk_chars: int, cores: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(cores)}
    out = subprocess.run([sys.executable, "-c", CEILING, str(tokenizer), str(corpus), str(chunk_chars)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_framework(tokenizer: Path, corpus: Path, cache: Path, num_proc: int | None = None,
                      chunk_chars: int | None = None) -> dict:
    """fw-prepare on ``corpus``; ``num_proc`` / ``chunk_chars`` None: the DataConfig defaults."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "framework", "prepare", "data.source=files", f"data.paths=[{corpus}/*.jsonl]",
           f"data.tokenizer_path={tokenizer}", f"data.cache_dir={cache}"]
    cmd += [] if num_proc is None else [f"data.num_proc={num_proc}"]
    cmd += [] if chunk_chars is None else [f"data.prepare_chunk_bytes={chunk_chars}"]
    proc, peak, wall = run_with_peak_rss(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fw-prepare failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    meta = json.loads(next(cache.glob("files-*/shards/meta.json")).read_text())
    docs = meta["documents"]["train"] + meta["documents"]["val"]
    tokens = meta["tokens"]["train"] + meta["tokens"]["val"] - docs  # without the <eos> the framework adds
    return {"wall_s": wall, "task_s": meta["seconds"], "tokens": tokens, "peak_rss": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100])
    p.add_argument("--file-mb", type=float, default=16.0, help="size of each JSONL file")
    p.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: the framework's default)")
    p.add_argument("--chunk-bytes", type=int, default=None,
                   help="data.prepare_chunk_bytes (default: the framework's default)")
    p.add_argument("--ceiling-chunk-bytes", type=int, default=4_000_000,
                   help="characters per encode_batch call of the ceiling (large: its thread pool's best case)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run both measurements this many times, alternating, and keep each one's fastest")
    p.add_argument("--workdir", default="", help="where corpora go (default: a tmp dir, removed after)")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    from framework.data.config import DataConfig

    num_proc = DataConfig.num_proc if args.num_proc is None else args.num_proc
    chunk_bytes = DataConfig.prepare_chunk_bytes if args.chunk_bytes is None else args.chunk_bytes
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # a --workdir that does not exist yet is created
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        work = Path(tmp)
        paragraphs = machine_paragraphs()
        tokenizer = work / "tokenizer" / "tokenizer.json"
        train_bench_tokenizer(paragraphs, tokenizer)
        print(f"{len(paragraphs):,} paragraphs, {sum(map(len, paragraphs)) / 1e6:.1f} M characters; {cores} cores, "
              f"data.num_proc {num_proc}, chunk {chunk_bytes:,} characters", flush=True)
        print("| corpus | documents | tokens | wall (s) | task (s) | framework tokens/s/core | ceiling tokens/s/core "
              "| ratio | peak RSS, process tree (MiB) |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        rows = []
        for size in args.sizes_mb:
            corpus = work / f"corpus_{size:g}MB"
            documents = write_corpus(corpus, paragraphs, int(size * 1e6), int(args.file_mb * 1e6))
            fw, ceiling = None, None
            for r in range(args.repeats):  # alternating, so both see the same (shared) machine
                cache = work / f"cache_{size:g}_{r}"
                run = measure_framework(tokenizer, corpus, cache, args.num_proc, args.chunk_bytes)
                fw = run if fw is None or run["task_s"] < fw["task_s"] else {**fw, "peak_rss": max(fw["peak_rss"], run["peak_rss"])}
                shutil.rmtree(cache)
                c = measure_ceiling(tokenizer, corpus, args.ceiling_chunk_bytes, cores)
                ceiling = c if ceiling is None or c["seconds"] < ceiling["seconds"] else ceiling
            assert int(ceiling["tokens"]) == fw["tokens"], (ceiling["tokens"], fw["tokens"])
            row = {"size_mb": size, "documents": documents, **fw, "ceiling_s": ceiling["seconds"],
                   "ratio": ceiling["seconds"] / fw["task_s"]}
            rows.append(row)
            print(f"| {size:g} MB | {documents:,} | {fw['tokens']:,} | {fw['wall_s']:.1f} | {fw['task_s']:.1f} | "
                  f"{fw['tokens'] / fw['task_s'] / cores:,.0f} | {fw['tokens'] / ceiling['seconds'] / cores:,.0f} | "
                  f"{row['ratio']:.2f} | {fw['peak_rss'] / 2**20:.0f} |", flush=True)
            for path in corpus.glob("*"):
                path.unlink()
    return rows


if __name__ == "__main__":
    main()
