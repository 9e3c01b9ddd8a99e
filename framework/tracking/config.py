"""Typed schema for the ``logger`` config group."""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.choices import WandbMode


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "framework"
    wandb_entity: str = ""  # "" = the credentials' default entity
    # "" = none for a single run; every member of a Hydra multirun gets the sweep's name, so a sweep is one group
    wandb_group: str = ""
    wandb_tags: list[str] = field(default_factory=list)
    # "auto": $WANDB_MODE when set, else online when credentials are set (WANDB_API_KEY or a netrc entry for
    # api.wandb.ai) and offline otherwise (sync later with `wandb sync <run_dir>/wandb/offline-run-*`)
    wandb_mode: WandbMode = "auto"
