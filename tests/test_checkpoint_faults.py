"""End to end through fw-train: two runs with one name, a checkpoint corrupted on disk, a disk that fills
during a checkpoint write. Each compares the losses with those of one uninterrupted run."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from framework.config import to_run_config
from framework.checkpointing.resume import scan_checkpoints
from framework.run import run
from test_checkpoint_integrity import flip_tensor_bytes

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["trainer.max_steps=12", "callbacks.checkpoint_every_n_steps=4", "callbacks.keep_checkpoints=-1",
             "trainer.log_every_n_steps=1", "trainer.val_check_interval=100", "data.val_windows=8", "torch_threads=1",
             "callbacks.throughput=false", "callbacks.model_card=false"]
PAUSED_RUN = """
import os, sys, time
from pathlib import Path
from framework.objectives.clm import CausalLM
step = CausalLM.training_step
def paused_at_step_2(self, batch, batch_idx):
    if self.trainer.global_step == 2 and not Path("{go}").exists():
        Path("{paused}").write_text(str(os.getpid()))
        while not Path("{go}").exists():
            time.sleep(0.05)
    return step(self, batch, batch_idx)
CausalLM.training_step = paused_at_step_2
from framework.commands.train import main
sys.argv = ["fw-train", *sys.argv[1:]]
main()
"""


def _csv_losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def _cli(data_cache: str, run_dir: Path) -> list[str]:
    return TINY + [f"data.cache_dir={data_cache}", *OVERRIDES, "name=shared", f"run_dir={run_dir}",
                   f"hydra.run.dir={run_dir}"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def alone(compose, tiny_prepared, tmp_path_factory) -> tuple[Path, list[tuple[int, float]]]:
    """One uninterrupted run: (its directory, its (step, train loss) rows); checkpoints at steps 4, 8, 12."""
    run_dir = tmp_path_factory.mktemp("alone")
    run(to_run_config(compose(OVERRIDES)), run_dir)
    return run_dir, _csv_losses(run_dir)


def _assert_same_losses(run_dir: Path, reference: list[tuple[int, float]]) -> None:
    losses = _csv_losses(run_dir)
    assert [s for s, _ in losses] == list(range(12))  # every step logged exactly once
    for (step, loss), (_, expected) in zip(losses, reference):
        assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6), step


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@pytest.mark.slow
def test_a_second_run_with_the_same_name_is_refused_before_it_writes_anything(alone, data_cache, tmp_path):
    run_dir = tmp_path / "runs" / "shared"
    paused, go = tmp_path / "paused", tmp_path / "go"
    script = PAUSED_RUN.format(paused=paused, go=go)
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: a paused writer must never block on it
    first = subprocess.Popen([sys.executable, "-c", script, *_cli(data_cache, run_dir)], cwd=tmp_path, env=_env(),
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paused.exists(), (tmp_path / "first.log").read_text()[-2000:]
        before = _snapshot(run_dir)
        second = subprocess.run([sys.executable, "-m", "framework", "train", *_cli(data_cache, run_dir)], cwd=tmp_path,
                                env=_env(), capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        last_line = second.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"error: run directory {run_dir.resolve()} is in use by pid {first.pid} on host ")
        assert "Traceback" not in second.stderr
        assert _snapshot(run_dir) == before  # no config.yaml, checkpoint or log written by the refused run
    finally:
        go.write_text("")
        first.wait(timeout=300)
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-2000:]
    _assert_same_losses(run_dir, alone[1])


@pytest.mark.slow
def test_a_checkpoint_with_flipped_tensor_bytes_is_skipped_and_the_resume_is_exact(alone, compose, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(alone[0], run_dir)
    ckpt_dir = run_dir / "checkpoints"
    for name in ("last.ckpt", "step0000012.ckpt"):  # as if killed during step 12: steps 4 and 8 remain
        (ckpt_dir / name).unlink()
    flip_tensor_bytes(ckpt_dir / "step0000008.ckpt")
    metrics = run(to_run_config(compose(OVERRIDES)), run_dir)  # resume=auto
    err = capsys.readouterr()
    assert f"skipping checkpoint {ckpt_dir / 'step0000008.ckpt'}: its contents do not match its checksum" in err.err
    assert f"resuming from {ckpt_dir / 'step0000004.ckpt'}" in err.out
    assert metrics["step"] == 12
    _assert_same_losses(run_dir, alone[1])  # = a resume from step 4 = the uninterrupted run


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a tmpfs of ``size`` bytes at tmp_path/run/checkpoints; unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        _mount_tmpfs(tmp_path / "run" / "checkpoints", size, mounted)
        return mounted[-1]

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.slow
def test_a_disk_full_during_a_checkpoint_write_stops_in_one_sentence_and_resumes_exactly(
        alone, compose, data_cache, small_tmpfs, tmp_path):
    size = (alone[0] / "checkpoints" / "step0000004.ckpt").stat().st_size  # bytes of one checkpoint
    ckpt_dir = small_tmpfs(int(2.5 * size) + 16 * 1024)  # step 4 and last.ckpt fit; step 8 fills it mid-write
    run_dir = ckpt_dir.parent
    proc = subprocess.run([sys.executable, "-m", "framework", "train", *_cli(data_cache, run_dir)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"error: could not write checkpoint {re.escape(str(ckpt_dir / 'step0000008.ckpt'))} \(No "
                         r"space left on device\): it needs about ([0-9.]+) MiB and ([0-9.]+) MiB is free there; .*\.",
                         last_line)
    assert match, last_line
    assert float(match.group(1)) == pytest.approx(size / 2**20, rel=0.1)  # estimated from the state's tensors
    assert float(match.group(2)) * 2**20 < size  # what was free, after the partial file was removed
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "last.ckpt.sha256", "step0000004.ckpt",
                                                           "step0000004.ckpt.sha256"]  # no temporary file left
    chosen, skipped = scan_checkpoints(ckpt_dir)
    assert chosen is not None and not skipped  # both earlier checkpoints verify against their checksums

    saved = tmp_path / "saved"  # the user frees space: here, the checkpoints move off the small disk
    shutil.copytree(ckpt_dir, saved)
    subprocess.run(["umount", str(ckpt_dir)], check=True)
    shutil.rmtree(ckpt_dir)
    shutil.copytree(saved, ckpt_dir)
    metrics = run(to_run_config(compose(OVERRIDES)), run_dir)  # resume=auto from step 4
    assert metrics["step"] == 12
    _assert_same_losses(run_dir, alone[1])


def _fill(directory: Path) -> Path:
    """Write a filler file into ``directory`` until its file system has no page left; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == 28, err  # ENOSPC
    return filler


def _mount_tmpfs(target: Path, size: int, mounted: list[Path]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    mounted.append(target)


@pytest.fixture
def csv_tmpfs(tmp_path):
    """A 3-page tmpfs at tmp_path/run/csv (where the CSV logger writes); unmounted at the end."""
    mounted: list[Path] = []
    _mount_tmpfs(tmp_path / "run" / "csv", 3 * 4096, mounted)
    yield mounted[0]
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_full_disk_while_appending_metrics_cuts_the_file_back_and_says_so_in_one_sentence(csv_tmpfs):
    from framework.tracking.metrics_log import MetricsWriteError, ResumableCSVLogger

    logger = ResumableCSVLogger(save_dir=str(csv_tmpfs.parent), name="csv", version="")
    metrics_csv = csv_tmpfs / "metrics.csv"
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save_durably()
    filler = _fill(csv_tmpfs)  # metrics.csv may grow within its one page, no further
    step, before = 1, metrics_csv.read_bytes()
    with pytest.raises(MetricsWriteError) as failed:
        for step in range(1, 5000):  # ~30 bytes a row: a new 4 KiB page is needed before step 150
            before = metrics_csv.read_bytes()
            logger.log_metrics({"train/loss": 1.0 + step / 1000}, step=step)
            logger.save_durably()
    message = str(failed.value)
    assert message.startswith(f"could not write the metrics log {metrics_csv} (No space left on device): ")
    assert "\n" not in message and message.endswith("run the same command to resume.")
    assert 1 < step < 4999 and len(before) > 3000
    assert metrics_csv.read_bytes() == before  # the partial row is gone: the file ends at a complete row
    assert sorted(p.name for p in csv_tmpfs.iterdir()) == ["filler", "metrics.csv"]

    logger.log_metrics({"train/loss": 5.0, "val/loss": 4.0}, step=step + 1)  # a new key: the header is rewritten
    with pytest.raises(MetricsWriteError):
        logger.save_durably()
    assert metrics_csv.read_bytes() == before and not (csv_tmpfs / "metrics.csv.tmp").exists()
    logger.finalize("failed")  # Lightning's teardown while the error is on its way out: no second error

    filler.unlink()  # space again: the rows the disk refused are written, each once
    logger.save_durably()
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(step + 2)) and rows[-1]["val/loss"] == "4.0"


@pytest.mark.slow
def test_a_full_disk_under_the_metrics_log_stops_in_one_sentence_and_the_rerun_logs_every_step_once(
        alone, compose, data_cache, csv_tmpfs, tmp_path):
    run_dir = csv_tmpfs.parent
    paused, go = tmp_path / "paused", tmp_path / "go"
    script = PAUSED_RUN.format(paused=paused, go=go).replace("global_step == 2", "global_step == 10")
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", script, *_cli(data_cache, run_dir)], cwd=tmp_path, env=_env(),
                            stdout=log, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paused.exists(), (tmp_path / "run.log").read_text()[-2000:]
        _fill(csv_tmpfs)  # the rows of steps 8-11 still fit in metrics.csv's page; the final evaluation's new
    finally:               # val/loss column rewrites the file through a temporary one, which needs a page more
        go.write_text("")
        _, stderr = proc.communicate(timeout=300)
        log.close()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    metrics_csv = csv_tmpfs / "metrics.csv"
    assert stderr.strip().splitlines()[-1].startswith(
        f"error: could not write the metrics log {metrics_csv} (No space left on device): "), stderr[-2000:]
    assert not (csv_tmpfs / "metrics.csv.tmp").exists() and not (run_dir / "final_metrics.json").exists()
    _assert_same_losses(run_dir, alone[1])  # every training row was written before the disk filled

    (csv_tmpfs / "filler").unlink()  # the user frees space and runs the same command
    metrics = run(to_run_config(compose(OVERRIDES)), run_dir)  # resume=auto from step 12: the final evaluation
    assert metrics["step"] == 12
    _assert_same_losses(run_dir, alone[1])
    with open(metrics_csv) as f:
        assert sum(1 for r in csv.DictReader(f) if r.get("val/loss")) == 1
