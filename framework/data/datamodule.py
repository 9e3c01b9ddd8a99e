"""A resumable, rank-aware DataModule over packed token shards.

The token stream of a split is cut into non-overlapping windows of ``window_length`` tokens (the
objective decides the length: ``seq_len + 1`` for causal LM, the pre-corruption length for span
corruption). Training order: epoch ``e`` visits every window once in the order of
``torch.randperm(n, generator=seed + e)``; rank ``r`` of ``w`` takes positions ``r, r + w, ...`` of that
order, so ranks never read the same window within an epoch. The position in this stream (micro-batches
consumed per rank) is saved in every checkpoint and restored on resume, so a resumed run continues with
the next unseen batch. Epochs roll over without end; ``trainer.max_steps`` stops training.

Objectives whose batches are random (masked LM, span corruption) get a ``torch.Generator`` per batch,
seeded by (seed, rank, position in the stream): the same batch is corrupted the same way whether the
run was interrupted or not, in whichever DataLoader worker it is collated, and differently each epoch.
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

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, int]:
        """``dataset[i]`` is window i; ``dataset[(i, position)]`` is (window i, position) for seeded collation."""
        if isinstance(key, tuple):
            return self._window(key[0]), key[1]
        return self._window(key)

    def _window(self, index: int) -> torch.Tensor:
        if self._arrays is None:
            self._arrays = [open_tokens(p, self.dtype) for p in self.shards]
        shard = int(np.searchsorted(self.cumulative, index, side="right") - 1)
        start = (index - int(self.cumulative[shard])) * self.window_length
        window = self._arrays[shard][start : start + self.window_length]
        return torch.from_numpy(window.astype(np.int64))


class ResumableRankSampler(Sampler[int]):
    """Infinite, seeded, rank-sharded order over ``num_windows`` windows, starting at ``start`` (per rank).

    With ``with_position`` it yields ``(window_index, position)``, position counting this rank's samples."""

    def __init__(self, num_windows: int, seed: int, rank: int, world_size: int, start: int = 0,
                 with_position: bool = False) -> None:
        if num_windows < world_size:
            raise ValueError(f"{num_windows} training windows cannot be shared among {world_size} ranks; "
                             "use more data or a shorter data.seq_len.")
        self.num_windows, self.seed, self.rank, self.world_size, self.start = num_windows, seed, rank, world_size, start
        self.per_rank = num_windows // world_size  # each rank's share of one epoch (remainder dropped)
        self.with_position = with_position

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        position = self.start
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_windows, generator=g)[self.rank :: self.world_size][: self.per_rank]
            for index in order[offset:].tolist():
                yield (index, position) if self.with_position else index
                position += 1
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
        sampler = ResumableRankSampler(len(self._train), self.seed, rank, world, start=self.samples_consumed,
                                       with_position=True)
        self._rank = rank
        return DataLoader(self._train, batch_size=self.micro_batch_size, sampler=sampler, collate_fn=self._collate,
                          num_workers=self.num_workers, drop_last=True, persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        n = min(self.val_windows, len(self._val))
        n -= n % world  # every rank evaluates the same number of windows, so the mean is unbiased
        indices = [(i, i) for i in range(rank, max(n, world), world)]  # (window, position = window index)
        subset = torch.utils.data.Subset(self._val, indices)
        return DataLoader(subset, batch_size=self.micro_batch_size, shuffle=False, collate_fn=self._val_collate,
                          num_workers=self.num_workers)

    def _batch_generator(self, stream: int, position: int) -> torch.Generator:
        # distinct streams for training (0) and validation (1); a fixed validation corruption keeps val/loss
        # comparable across evaluations
        rank = getattr(self, "_rank", 0) if stream == 0 else 0
        return torch.Generator().manual_seed(hash((self.seed, stream, rank, position)) & 0x7FFF_FFFF_FFFF_FFFF)

    def _collate(self, items: list[tuple[torch.Tensor, int]], stream: int = 0):
        batch = torch.stack([window for window, _ in items])  # (B, window_length)
        if self.collate_fn is None:
            return batch
        return self.collate_fn(batch, generator=self._batch_generator(stream, items[0][1]))

    def _val_collate(self, items: list[tuple[torch.Tensor, int]]):
        return self._collate(items, stream=1)

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
