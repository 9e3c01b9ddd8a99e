"""Strategy config -> a Lightning strategy. Parallelism is applied from outside the model code."""

from __future__ import annotations

from typing import Any

import torch

from framework.distributed.config import StrategyConfig


def build_strategy(cfg: StrategyConfig, accelerator: str = "auto") -> Any:
    if cfg.name == "auto":
        return "auto"
    if cfg.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo")
    raise ValueError(f"strategy={cfg.name!r} is not one of: auto, ddp.")
