"""fw-submit's user errors: one line on stderr, exit status 2, nothing written; and the run-directory lock.

A fake ``sbatch`` (a shell script on PATH) stands in for SLURM: these tests need none.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from framework.commands.submit import main
from test_slurm import _overrides


def _fake_sbatch(directory: Path, body: str) -> Path:
    """An executable ``sbatch`` in ``directory`` that runs ``body`` (a shell snippet) and logs its arguments."""
    directory.mkdir(exist_ok=True)
    path = directory / "sbatch"
    path.write_text(f'#!/bin/sh\necho "$@" >> {directory}/calls\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fails_in_one_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fw-submit: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def in_workdir(tmp_path, monkeypatch) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # fw-submit puts runs/<name>/ under the working directory
    return workdir


def test_no_sbatch_on_path_is_one_sentence_and_writes_nothing(in_workdir, data_cache, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(in_workdir / "empty-bin"))
    err = _fails_in_one_line(capsys, _overrides(data_cache, "nosbatch"))
    assert "cluster.sbatch='sbatch' is not an executable on PATH" in err and "Errno" not in err
    assert list(in_workdir.iterdir()) == []  # no runs/, no job.sbatch, no config.yaml, no lock file


def test_a_missing_custom_sbatch_path_is_named(in_workdir, data_cache, capsys):
    err = _fails_in_one_line(capsys, _overrides(data_cache, "custom", "cluster.sbatch=/nowhere/sbatch"))
    assert "cluster.sbatch='/nowhere/sbatch'" in err
    assert list(in_workdir.iterdir()) == []


def test_sbatch_refusing_the_job_leaves_no_files(in_workdir, data_cache, capsys, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_sbatch(bin_dir, 'echo "sbatch: error: invalid partition specified: gpu" >&2\nexit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    err = _fails_in_one_line(capsys, _overrides(data_cache, "refused", "cluster.partition=gpu"))
    assert "sbatch refused the job" in err and "invalid partition specified: gpu" in err
    assert (bin_dir / "calls").exists()  # sbatch was asked
    assert list(in_workdir.iterdir()) == []  # the directories it created (runs/, runs/refused/) are gone again


def test_a_bad_override_exits_2_in_one_line(in_workdir, data_cache, capsys):
    err = _fails_in_one_line(capsys, _overrides(data_cache, "bad", "trainer.devices=4"))
    assert "trainer.devices=4 differs from cluster.devices_per_node=2" in err
    err = _fails_in_one_line(capsys, _overrides(data_cache, "typo", "trainer.max_stepz=3"))  # Hydra's multi-line error
    assert "max_stepz" in err
    assert list(in_workdir.iterdir()) == []


def test_a_run_directory_in_use_is_refused_before_the_script_is_rewritten(in_workdir, data_cache, capsys,
                                                                           monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_sbatch(bin_dir, "echo '41;ci'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = in_workdir / "runs" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / "job.sbatch").write_text("the running job's script")
    with open(run_dir / ".run.lock", "w") as held:  # a running job holds the lock (another open file: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "40"}))
        held.flush()
        err = _fails_in_one_line(capsys, _overrides(data_cache, "busy"))
    assert f"run directory {run_dir} is in use by pid {os.getpid()}" in err and "SLURM job 40" in err
    assert (run_dir / "job.sbatch").read_text() == "the running job's script" and not (run_dir / "config.yaml").exists()
    assert not (bin_dir / "calls").exists()  # sbatch never called

    main(_overrides(data_cache, "busy"))  # the run ended (lock released): the submission goes ahead
    assert capsys.readouterr().out.startswith(f"submitted job 41; run directory {run_dir}")
    assert "srun " in (run_dir / "job.sbatch").read_text() and (run_dir / "config.yaml").exists()
    assert (bin_dir / "calls").read_text().split() == ["--parsable", str(run_dir / "job.sbatch")]
    with open(run_dir / ".run.lock") as after:  # fw-submit let go of the lock before sbatch: the job takes it
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)
