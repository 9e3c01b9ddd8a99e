"""A resumable, rank-aware DataModule over packed token shards.

The token stream of a split is cut into non-overlapping windows of ``window_length`` tokens (the
objective decides the length: ``seq_len + 1`` for causal LM, the pre-corruption length for span
corruption). Training order: epoch ``e`` visits every window once in the order of
``torch.randperm(n, generator=seed + e)``; rank ``r`` of ``w`` takes positions ``r, r + w, ...`` of that
order, so ranks never read the same window within an epoch. The position in this stream (micro-batches
consumed per rank) is saved in every checkpoint and restored on resume, so a resumed run continues with
the next unseen batch. Epochs roll over without end; ``trainer.max_steps`` stops training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from framework.data.prepare import PreparedData, open_tokens, shard_token_count


class PackedWindows(Dataset):
    """Window ``i`` of a split: ``window_length`` consecutive tokens that never cross a shard boundary."""

    def __init__(self, shards: list[Path], dtype: np.dtype, window_length: int) -> None:
        self.shards, self.dtype, self.window_length = shards, dtype, window_length
        counts = [shard_token_count(p, dtype) // window_length for p in shards]
        self.cumulative = np.cumsum([0] + counts)
        self._arrays: list[np.ndarray] | None = None  # opened lazily, per worker process

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._arrays is None:
            self._arrays = [open_tokens(p, self.dtype) for p in self.shards]
        shard = int(np.searchsorted(self.cumulative, index, side="right") - 1)
        start = (index - int(self.cumulative[shard])) * self.window_length
        window = self._arrays[shard][start : start + self.window_length]
        return torch.from_numpy(window.astype(np.int64))


class ResumableRankSampler(Sampler[int]):
    """Infinite, seeded, rank-sharded order over ``num_windows`` windows, starting at ``start`` (per rank)."""

    def __init__(self, num_windows: int, seed: int, rank: int, world_size: int, start: int = 0) -> None:
        if num_windows < world_size:
            raise ValueError(f"{num_windows} training windows cannot be shared among {world_size} ranks; "
                             "use more data or a shorter data.seq_len.")
        self.num_windows, self.seed, self.rank, self.world_size, self.start = num_windows, seed, rank, world_size, start
        self.per_rank = num_windows // world_size  # each rank's share of one epoch (remainder dropped)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_windows, generator=g)[self.rank :: self.world_size][: self.per_rank]
            yield from order[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # Lightning treats the loader as unsized when this raises
        raise TypeError("the training stream is infinite")


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, prepared: PreparedData, window_length: int, micro_batch_size: int,
                 collate_fn: Callable | None = None, seed: int = 0, num_workers: int = 0, val_windows: int = 64) -> None:
        super().__init__()
        self.prepared = prepared
        self.window_length = window_length
        self.micro_batch_size = micro_batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.num_workers = num_workers
        self.val_windows = val_windows
        self.samples_consumed = 0  # windows consumed by this rank; restored from checkpoints
        self._train = PackedWindows(prepared.shards("train"), prepared.dtype, window_length)
        self._val = PackedWindows(prepared.shards("val"), prepared.dtype, window_length)
        if len(self._train) == 0 or len(self._val) == 0:
            raise ValueError(
                f"window_length={window_length} tokens leaves {len(self._train)} training and {len(self._val)} "
                "validation windows; lower data.seq_len or use more data."
            )

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ResumableRankSampler(len(self._train), self.seed, rank, world, start=self.samples_consumed)
        return DataLoader(self._train, batch_size=self.micro_batch_size, sampler=sampler, collate_fn=self._collate,
                          num_workers=self.num_workers, drop_last=True, persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        n = min(self.val_windows, len(self._val))
        n -= n % world  # every rank evaluates the same number of windows, so the mean is unbiased
        indices = list(range(rank, max(n, world), world))
        subset = torch.utils.data.Subset(self._val, indices)
        return DataLoader(subset, batch_size=self.micro_batch_size, shuffle=False, collate_fn=self._val_collate,
                          num_workers=self.num_workers)

    def _collate(self, windows: list[torch.Tensor]):
        batch = torch.stack(windows)  # (B, window_length)
        return self.collate_fn(batch) if self.collate_fn is not None else batch

    def _val_collate(self, windows: list[torch.Tensor]):
        # validation batches are corrupted/masked with a fixed generator so val/loss is comparable over time
        batch = torch.stack(windows)
        if self.collate_fn is None:
            return batch
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed + int(batch[0, 0]))
        try:
            return self.collate_fn(batch)
        finally:
            torch.random.set_rng_state(state)

    # ------------------------------------------------------------------ resume
    def on_micro_batch_consumed(self) -> None:
        self.samples_consumed += self.micro_batch_size

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "window_length": self.window_length,
                "tokenizer_hash": self.prepared.meta["tokenizer_hash"]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("tokenizer_hash") not in (None, self.prepared.meta["tokenizer_hash"]):
            raise ValueError("this checkpoint was trained with a different tokenizer/corpus than the configured data; "
                             "resume with the same data settings or start a new run (resume=never).")
        self.samples_consumed = int(state["samples_consumed"])
