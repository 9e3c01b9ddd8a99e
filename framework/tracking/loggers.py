"""Logger config -> Lightning loggers (CSV, TensorBoard, wandb), all writing inside the run directory."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from framework.tracking.config import LoggerConfig


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: LoggerConfig) -> str:
    if cfg.wandb_mode == "auto":
        return "online" if wandb_has_credentials() else "offline"
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.wandb_mode={cfg.wandb_mode!r} must be auto, online, offline or disabled.")
    return cfg.wandb_mode


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id: created once, stored in the run directory, reused on every resume."""
    path = run_dir / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id)
    try:
        os.link(tmp, path)  # first writer wins if several ranks race
    except FileExistsError:
        pass
    tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str) -> list:
    loggers = []
    if cfg.csv:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if cfg.wandb:
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(cfg)
        loggers.append(WandbLogger(
            project=cfg.wandb_project, entity=cfg.wandb_entity or None, group=cfg.wandb_group or None,
            tags=list(cfg.wandb_tags) or None, name=run_name, id=wandb_run_id(run_dir), resume="allow",
            save_dir=str(run_dir), offline=(mode == "offline"), mode=mode,
        ))
    return loggers
