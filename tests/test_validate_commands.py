"""The console commands, as a new user runs them: a mistake is one line on stderr naming the value or file,
exit status 2, no traceback, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FRAMEWORK_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1, stderr
    return errors[0]


TRAIN = ["framework", "train", "model=tiny", "trainer.accelerator=cpu", "data.max_documents=50"]


@pytest.mark.parametrize("overrides,named", [
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["objective=mlm", "model=gpt2-small"], "objective=mlm"),
    pytest.param(["model.vocab_size=999"], "model.vocab_size=999", marks=pytest.mark.slow),
    pytest.param(["optim.lr=-1e-3"], "optim.lr=-0.001", marks=pytest.mark.slow),
    pytest.param(["trainer.devices=0"], "trainer.devices=0", marks=pytest.mark.slow),
])
def test_train_refuses_before_any_data_is_read(tmp_path, overrides, named):
    cache = tmp_path / "cache"
    rc, err = _run(TRAIN + overrides + [f"data.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert rc == 2 and named in _one_error_line(err)
    assert not cache.exists()  # refused before data preparation
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_prepare_names_an_unknown_key_and_validates(tmp_path):
    cache = tmp_path / "cache"
    rc, err = _run(["framework", "prepare", "data.seq_lenn=64", f"data.cache_dir={cache}"], tmp_path)
    assert rc == 2 and "data.seq_lenn is not a setting" in _one_error_line(err)
    rc, err = _run(["framework", "prepare", "model.n_layers=0", f"data.cache_dir={cache}"], tmp_path)
    assert rc == 2 and "model.n_layers=0" in _one_error_line(err)
    assert not cache.exists()


def test_prepare_names_the_bad_json_line_and_leaves_no_directory(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "' + "a fine document " * 10 + '"}\n{"text": broken\n')
    cache = tmp_path / "cache"
    rc, err = _run(["framework", "prepare", "data.source=files", f"data.paths=[{corpus}]",
                    f"data.cache_dir={cache}", "data.num_proc=1"], tmp_path)
    line = _one_error_line(err)
    assert rc == 2 and str(corpus) in line and "line 2" in line
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no half-made source directory


def test_export_and_generate_name_a_missing_or_damaged_checkpoint(tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"PK\x03\x04 not a zip archive")
    for args in (["framework", "export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")],
                 ["framework", "export", str(damaged), str(tmp_path / "out")],
                 ["framework", "generate", str(damaged), "--prompt", "hello"]):
        rc, err = _run(args, tmp_path)
        line = _one_error_line(err)
        assert rc == 2 and args[1] in line, line
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_directory_without_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    rc, err = _run(["framework", "export", str(tmp_path / "any.ckpt"), str(out)], tmp_path)
    assert rc == 2 and "--overwrite" in _one_error_line(err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "the user's file"
