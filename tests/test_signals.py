"""Stops by signal and by kill, end to end: SIGTERM and SIGINT checkpoint at the next step boundary and exit
non-zero, a kill right after a checkpoint loses no metrics row, resumed losses equal an uninterrupted run's,
and running a finished run's command again changes nothing."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from framework.config import to_run_config
from framework.checkpointing.checkpoints import find_resume_checkpoint, safe_load
from framework.tracking.run_state import run_is_finished
from framework.run import run

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["trainer.max_steps=12", "callbacks.checkpoint_every_n_steps=4", "callbacks.keep_checkpoints=1",
             "trainer.log_every_n_steps=1", "trainer.val_check_interval=100", "data.val_windows=8", "torch_threads=1"]

# `python3 -m framework train` with one test hook: "signal" makes rank 0 send `sig` to itself inside the training
# step that ends at optimizer step at+1 (after its forward pass); "kill_after_checkpoint" SIGKILLs itself right
# after last.ckpt of step `at` is written (the last file of that step's checkpoint, before Lightning logs the
# step). Every process writes its exit status to exit-<local rank>.txt. A file, not `python -c`: Lightning's
# launcher starts rank 1 by running the same script again.
RUNNER = """
import os, signal, sys
from framework.checkpointing.checkpoints import AtomicCheckpointIO
from framework.objectives.clm import CausalLM
mode, sig, at = {mode!r}, {sig}, {at}
if mode == "signal":
    step = CausalLM.training_step
    def signalled(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        if self.trainer.global_step == at and self.trainer.global_rank == 0:
            os.kill(os.getpid(), sig)
        return loss
    CausalLM.training_step = signalled
elif mode == "kill_after_checkpoint":
    save = AtomicCheckpointIO.save_checkpoint
    def killed_after(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if os.path.basename(path) == "last.ckpt" and checkpoint["global_step"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    AtomicCheckpointIO.save_checkpoint = killed_after
from framework.commands.train import main
try:
    main()
except SystemExit as exit:
    with open(f"exit-{{os.environ.get('LOCAL_RANK', '0')}}.txt", "w") as f:
        f.write(str(exit.code))
    raise
"""


def _train(run_dir: Path, data_cache: str, mode: str, sig: int = 0, at: int = -1, extra: tuple[str, ...] = ()):
    cli = TINY + [f"data.cache_dir={data_cache}", *OVERRIDES, *extra, f"run_dir={run_dir}",
                  f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LOCAL_RANK", None)
    script = run_dir.parent / "runner.py"
    script.write_text(RUNNER.format(mode=mode, sig=sig, at=at))
    return subprocess.run([sys.executable, str(script), *cli], cwd=run_dir.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train/loss"])) for r in _rows(run_dir) if r.get("train/loss")]


def _assert_exact_log(run_dir: Path, reference: Path) -> None:
    """Every step 0..11 has exactly one train row, no validation row is repeated, losses equal the reference's."""
    resumed, full = _train_losses(run_dir), dict(_train_losses(reference))
    assert [s for s, _ in resumed] == list(range(12))
    for step, loss in resumed:
        assert loss == pytest.approx(full[step], rel=1e-6, abs=1e-6), step
    val_steps = [int(r["step"]) for r in _rows(run_dir) if r.get("val/loss")]
    assert len(val_steps) == len(set(val_steps)), val_steps


@pytest.fixture(scope="module")
def uninterrupted(compose, data_cache, tiny_prepared, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("signals") / "full"
    run(to_run_config(compose(OVERRIDES)), run_dir)
    return run_dir


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_exits_143_and_resumes_exactly(compose, data_cache, uninterrupted,
                                                                           tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _train(run_dir, data_cache, "signal", int(signal.SIGTERM), at=5)  # inside the step that ends at 6
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped by SIGTERM at step 6" in proc.stderr
    assert find_resume_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / "preempted-step0000006.ckpt"
    assert safe_load(run_dir / "checkpoints" / "preempted-step0000006.ckpt")["global_step"] == 6
    assert not (run_dir / "final_metrics.json").exists()  # no final evaluation of an unfinished model
    assert [s for s, _ in _train_losses(run_dir)] == list(range(6))

    metrics = run(to_run_config(compose(OVERRIDES)), run_dir)  # resume=auto
    assert metrics["step"] == 12
    _assert_exact_log(run_dir, uninterrupted)


@pytest.mark.slow
def test_kill_right_after_a_checkpoint_loses_no_metrics_row(compose, data_cache, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _train(run_dir, data_cache, "kill_after_checkpoint", at=8)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert safe_load(find_resume_checkpoint(run_dir / "checkpoints"))["global_step"] == 8
    # the row of step 8 (CSV step 7) was on disk before its checkpoint, although Lightning logs it afterwards
    assert [s for s, _ in _train_losses(run_dir)] == list(range(8))

    run(to_run_config(compose(OVERRIDES)), run_dir)
    _assert_exact_log(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_rank_0_only_stops_both_ddp_ranks_at_the_agreed_step_with_status_143(data_cache, tiny_prepared,
                                                                                       tmp_path):
    """Kubernetes signals only the container's first process: rank 1 learns of it through the all-reduce
    (every ``cluster.preemption_check_every_n_steps`` steps), both save the same checkpoint and exit 143."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _train(run_dir, data_cache, "signal", int(signal.SIGTERM), at=5,
                  extra=("trainer.devices=2", "strategy=ddp", "cluster.preemption_check_every_n_steps=4"))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert {p.name: p.read_text() for p in tmp_path.glob("exit-*.txt")} == {"exit-0.txt": "143", "exit-1.txt": "143"}
    assert safe_load(run_dir / "checkpoints" / "preempted-step0000008.ckpt")["global_step"] == 8  # 5 -> next 4k
    assert [s for s, _ in _train_losses(run_dir)] == list(range(8))
    assert "Traceback" not in proc.stderr


def _signal_inside_step(monkeypatch, sig: signal.Signals, at: int) -> None:
    """In this process: send ``sig`` inside the training step that ends at optimizer step at+1."""
    from framework.objectives.clm import CausalLM

    step = CausalLM.training_step

    def signalled(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        if self.trainer.global_step == at:
            os.kill(os.getpid(), sig)
        return loss

    monkeypatch.setattr(CausalLM, "training_step", signalled)


@pytest.mark.slow
def test_sigint_checkpoints_at_the_next_step_and_asks_for_exit_status_130(compose, tiny_prepared, monkeypatch,
                                                                         tmp_path):
    _signal_inside_step(monkeypatch, signal.SIGINT, at=2)
    handler_before = signal.getsignal(signal.SIGINT)
    metrics = run(to_run_config(compose(OVERRIDES)), tmp_path)  # main() exits with metrics["exit_status"]
    assert metrics == {"step": 3, "preempted": True, "requeued": False, "stop_signal": "SIGINT", "exit_status": 130}
    assert safe_load(tmp_path / "checkpoints" / "preempted-step0000003.ckpt")["global_step"] == 3
    assert [s for s, _ in _train_losses(tmp_path)] == list(range(3))
    assert not (tmp_path / "final_metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl+C raises KeyboardInterrupt again


@pytest.mark.slow
def test_running_a_finished_run_again_changes_nothing(data_cache, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "config.yaml").write_text("the config the run was trained with\n")
    # the run lock records whoever last held it (host, pid, time): the only file a re-run may touch
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file() and p.name != ".run.lock"}
    proc = _train(run_dir, data_cache, "none")  # the same command, resume=auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stdout.splitlines() if "already finished" in line]
    assert len(said) == 1 and "(step 12" in said[0] and str(run_dir / "final_metrics.json") in said[0], proc.stdout
    assert {p for p in run_dir.rglob("*") if p.is_file()} - {run_dir / "train.log", run_dir / ".run.lock"} == set(files)
    for path, (content, mtime) in files.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path
    # asked for more steps, the same run is not finished: it would resume from its step-12 checkpoint
    assert not run_is_finished(run_dir, 16) and run_is_finished(run_dir, 12)
