"""wandb tracking: offline without credentials, run files with the logged metrics, the run id across resume,
one group per Hydra multirun."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest

from framework.tracking.config import LoggerConfig
from framework.tracking.loggers import build_loggers, wandb_mode


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` transaction log. wandb (0.31) ships no Python reader; the format is
    a 7-byte header (":W&B", magic 0xBEE1, version) then LevelDB-log framing in 32 KiB blocks: per chunk a
    CRC32 (4 bytes), length (2, little-endian) and type (1: full, 2: first, 3: middle, 4: last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, block, pending = 7, 32 * 1024, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(path: Path, timeout_s: float = 60.0) -> tuple[dict, list[dict]]:
    """(run record fields, history rows {metric: float}) of one offline run's .wandb file, once wandb's service
    process has written the run's exit record (it flushes the file after ``wandb.finish`` returns)."""
    import json
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run, history = {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"id": record.run.run_id, "project": record.run.project, "group": record.run.run_group,
                   "tags": list(record.run.tags), "name": record.run.display_name}
        elif kind == "history":
            history.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                            for item in record.history.item})
    return run, history


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))


def test_mode_is_offline_without_credentials(no_credentials, monkeypatch):
    assert wandb_mode(LoggerConfig(wandb=True)) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggerConfig(wandb=True)) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's environment wins in auto mode
    assert wandb_mode(LoggerConfig(wandb=True)) == "offline"
    assert wandb_mode(LoggerConfig(wandb=True, wandb_mode="disabled")) == "disabled"
    with pytest.raises(ValueError, match="logger.wandb_mode"):
        wandb_mode(LoggerConfig(wandb=True, wandb_mode="sometimes"))


@pytest.mark.slow
def test_offline_run_files_hold_the_metrics_and_resume_keeps_the_run_id(compose, tmp_path, no_credentials):
    from framework.config import to_run_config
    from framework.run import run

    overrides = ["logger=wandb", "logger.wandb_project=fw-test", "logger.wandb_group=tiny-runs",
                 "logger.wandb_tags=[tiny,ci]", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                 "callbacks.checkpoint_every_n_steps=2", "torch_threads=1", "data.val_windows=4"]
    run_dir = tmp_path / "run"
    run(to_run_config(compose(overrides + ["trainer.max_steps=4"])), run_dir)
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert files[0].name == f"run-{run_id}.wandb"
    info, history = read_offline_run(files[0])
    assert info == {"id": run_id, "project": "fw-test", "group": "tiny-runs", "tags": ["tiny", "ci"], "name": "default"}

    # every train/loss the CSV logger got is in the wandb history at the same step, with the same value
    csv_rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    csv_loss = {int(r["step"]): float(r["train/loss"]) for r in csv_rows if r.get("train/loss")}
    wandb_loss = {int(h["trainer/global_step"]): h["train/loss"] for h in history if "train/loss" in h}
    assert sorted(wandb_loss) == [0, 1, 2, 3] and wandb_loss == pytest.approx(csv_loss, rel=1e-6)
    logged = set().union(*history)
    assert {"val/loss", "throughput/tokens_per_sec", "throughput/samples_per_sec", "compute/flops",
            "compute/pf_days", "train/lr"} <= logged
    flops_first = max(h["compute/flops"] for h in history if "compute/flops" in h)

    # resume: a second process-like run on the same directory continues the same wandb run
    run(to_run_config(compose(overrides + ["trainer.max_steps=6"])), run_dir)
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}
    info2, history2 = read_offline_run(files[-1])  # offline-run-<date>_<time>-<id>: the newest sorts last
    assert info2["id"] == run_id
    steps = sorted(int(h["trainer/global_step"]) for h in history2 if "train/loss" in h)
    assert steps == [4, 5]  # the resumed run continues after the checkpoint
    flops = [h["compute/flops"] for h in history2 if "compute/flops" in h]
    assert min(flops) > flops_first  # cumulative compute continues from the checkpoint


def test_multirun_members_share_the_sweep_group(tmp_path, no_credentials):
    """Members of a Hydra multirun (same hydra.sweep.dir, different job numbers) get one wandb group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from framework.config import compose_config

    groups, names = [], []
    try:
        for num in (0, 1):
            cfg = compose_config(["name=lr-sweep"], hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.mode = RunMode.MULTIRUN
                cfg.hydra.job.num = num
            HydraConfig.instance().set_config(cfg)
            (logger,) = build_loggers(LoggerConfig(csv=False, wandb=True), tmp_path / str(num), "lr-sweep")
            groups.append(logger._wandb_init["group"])
            names.append(logger._wandb_init["name"])
        cfg = compose_config(["name=lr-sweep"], hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)
        (single,) = build_loggers(LoggerConfig(csv=False, wandb=True), tmp_path / "single", "lr-sweep")
        (explicit,) = build_loggers(LoggerConfig(csv=False, wandb=True, wandb_group="mine"), tmp_path / "e", "x")
    finally:
        HydraConfig.instance().cfg = None
    assert groups == ["lr-sweep", "lr-sweep"]  # the sweep directory multirun/lr-sweep
    assert names == ["lr-sweep-0", "lr-sweep-1"]
    assert single._wandb_init["group"] is None and single._wandb_init["name"] == "lr-sweep"
    assert explicit._wandb_init["group"] == "mine"
