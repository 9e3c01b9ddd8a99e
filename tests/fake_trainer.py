"""What a DataModule reads of a Lightning trainer, for tests that play rank r of W in one process."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class FakeTrainer:
    """Rank ``rank`` of ``world`` on the CPU."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size, self.num_devices = rank, world, world
        self.strategy = SimpleNamespace(root_device=torch.device("cpu"))
