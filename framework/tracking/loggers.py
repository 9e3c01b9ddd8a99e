"""Logger config -> Lightning loggers (CSV, TensorBoard, wandb), all writing inside the run directory."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from framework.choices import WandbMode, names
from framework.tracking.config import LoggerConfig
from framework.tracking.metrics_log import ResumableCSVLogger

WANDB_MODES = tuple(m for m in names(WandbMode) if m != "auto")  # wandb's own modes


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: LoggerConfig) -> str:
    if cfg.wandb_mode == "auto":
        if os.environ.get("WANDB_MODE") in WANDB_MODES:
            return os.environ["WANDB_MODE"]  # the user's environment decides, as wandb itself would
        return "online" if wandb_has_credentials() else "offline"
    if cfg.wandb_mode not in WANDB_MODES:  # composition refuses it; a TrainConfig built in code may still hold it
        raise ValueError(f"logger.wandb_mode={cfg.wandb_mode!r} must be auto or one of {', '.join(WANDB_MODES)}.")
    return str(cfg.wandb_mode)


def hydra_multirun_job() -> tuple[str, int] | None:
    """(sweep name, job number) when this process is a member of a Hydra multirun, else None.
    The sweep name is the last part of ``hydra.sweep.dir`` (``multirun/<name>`` in conf/train.yaml)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hc.sweep.dir)).name, int(hc.job.num)


def wandb_group_and_name(cfg: LoggerConfig, run_name: str) -> tuple[str | None, str]:
    """The group (``logger.wandb_group``; by default the sweep's name for every member of a multirun, so a
    sweep shows as one group) and the run's display name (``<name>-<job number>`` inside a multirun)."""
    job = hydra_multirun_job()
    if job is None:
        return cfg.wandb_group or None, run_name
    sweep, num = job
    return cfg.wandb_group or sweep, f"{run_name}-{num}"


def wandb_run_id(run_dir: Path, from_checkpoint: str | None = None) -> str:
    """The run's wandb id: created once, stored in the run directory, reused on every resume.
    ``from_checkpoint``: the id stored in the checkpoint being resumed, which wins over the file."""
    path = run_dir / "wandb_run_id.txt"
    if from_checkpoint:
        return from_checkpoint
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


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, wandb_id: str | None = None) -> list:
    """``wandb_id``: the wandb run id stored in the checkpoint being resumed, if any."""
    loggers = []
    if cfg.csv:
        loggers.append(ResumableCSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if cfg.wandb:
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(cfg)
        group, name = wandb_group_and_name(cfg, run_name)
        loggers.append(WandbLogger(
            project=cfg.wandb_project, entity=cfg.wandb_entity or None, group=group,
            tags=list(cfg.wandb_tags) or None, name=name, id=wandb_run_id(run_dir, wandb_id), resume="allow",
            save_dir=str(run_dir), offline=(mode == "offline"), mode=mode,
        ))
    return loggers


def finish_wandb(trainer) -> None:
    """Close this process's wandb run, so a later run in the same process (the members of a Hydra multirun
    under the basic launcher, or a resumed run in a test) starts its own instead of reusing this one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and trainer.is_global_zero:
        import wandb

        if wandb.run is not None:
            wandb.finish()
