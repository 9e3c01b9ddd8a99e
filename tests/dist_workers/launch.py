"""Launching the workers: one run per argument set per pytest session, shared by the test files.

Timeouts (seconds) are ceilings for a loaded 2-core machine: the FSDP2 variants test took 210-240 s beside
two busy processes on a 2-core machine shared with other jobs (300 s was the old ceiling); a passing run
never waits for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# tiny runs for the parity tests: 6 optimizer steps of the tiny decoder, no validation during fit
TINY_RUN = [
    "model=tiny", "data.max_documents=800", "data.vocab_size=512", "data.seq_len=64", "data.num_proc=1",
    "data.val_windows=8", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "optim.warmup_steps=3",
    "trainer.max_steps=6", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
    "callbacks.checkpoint_every_n_steps=3", "callbacks.keep_checkpoints=-1", "logger.csv=false",
]

_done: dict[tuple, dict] = {}


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train(out: Path, overrides: list[str], resume: str | None = None, timeout: int = 900) -> dict:
    """Run tests/dist_workers/train_worker.py once per (overrides, resume); returns result.json plus ``out``."""
    key = (tuple(overrides), resume)
    if key not in _done:
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / "train_worker.py"), str(out)] + (["--resume", resume] if resume else [])
        proc = subprocess.run(cmd + TINY_RUN + overrides, env=_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        _done[key] = {**json.loads((out / "result.json").read_text()), "out": out}
    return _done[key]


def torchrun(script: str, out: Path, *args: str, nproc: int = 2, timeout: int = 900, env: dict | None = None) -> None:
    """Run a tests/dist_workers script under torchrun with ``nproc`` CPU processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), str(out), *args]
    proc = subprocess.run(cmd, env={**_env(), **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
