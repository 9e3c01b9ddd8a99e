"""Typed schema for the ``logger`` config group."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "framework"
    wandb_entity: str = ""
    wandb_group: str = ""
    wandb_tags: list[str] = field(default_factory=list)
    # "auto": online when credentials are set (WANDB_API_KEY or a netrc entry), offline otherwise
    wandb_mode: str = "auto"
