"""The global sample stream: which window each rank reads at each step (framework/data/datamodule.py explains the
order). Rank ``r`` of ``W`` with micro-batch ``B`` takes block ``r`` of every ``W B`` global positions; each position
goes to a source by the mixture schedule (framework/data/mixture_schedule.py) and reads that source's own endless,
per-epoch Feistel-permuted stream (framework/data/permutation.py). Host-side numpy; no Lightning."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from framework.data.mixture_schedule import MixtureSchedule
from framework.data.permutation import stream_windows


def rank_positions(start: int, rank: int, world_size: int, micro_batch_size: int, first: int,
                   count: int, skips: tuple[tuple[int, int], ...] = ()) -> np.ndarray:
    """Global positions (int64, (count,)) of samples ``first .. first + count - 1`` of rank ``rank``'s stream from
    global position ``start``: its k-th sample sits in global micro-batch ``k // B``, block ``rank``. ``skips``:
    (stream position, width) ranges the stream jumps over (the spike guard's rollbacks)."""
    k = np.arange(first, first + count, dtype=np.int64)
    block = world_size * micro_batch_size  # global samples per micro-batch of all ranks
    return skip_positions(start + (k // micro_batch_size) * block + rank * micro_batch_size + k % micro_batch_size,
                          skips)


def skip_positions(positions: np.ndarray, skips: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Samples consumed -> stream positions when the stream jumps over each ``[start, start + width)`` of ``skips``
    (stream coordinates, non-overlapping): every position at or past a skip's start moves on by its width."""
    for start, width in sorted(skips):
        positions = np.where(positions >= start, positions + width, positions)
    return positions


def source_stream(name: str) -> int:
    """The permutation stream of mixture source ``name``: sources sharing a seed get unrelated orders."""
    return zlib.crc32(name.encode())


class MixtureSampler(Sampler):
    """Rank ``rank`` of ``world_size``'s share of the global stream from GLOBAL position ``start`` (samples all ranks
    consumed before), in blocks of ``micro_batch_size`` (``rank_positions``); yields ``(source, window, global
    position)``. Position ``p`` goes to the source ``MixtureSchedule(weights)`` gives it; a source's j-th draw reads
    window ``FeistelPermutation(n_s, seed, j // n_s, stream_s)(j mod n_s)`` (``streams``: ``source_stream(name)``
    per source by default). One source of weight 1 draws every position: its j-th draw is position j. Memory: one
    chunk of ``CHUNK`` positions, whatever the number of windows."""

    CHUNK = 4096  # samples computed per vectorised call

    def __init__(self, names: list[str], weights: list[float], num_windows: list[int], seed: int, rank: int,
                 world_size: int, start: int = 0, micro_batch_size: int = 1, skips: tuple = (),
                 streams: list[int] | None = None) -> None:
        empty = [name for name, n in zip(names, num_windows) if n < 1]
        if empty:
            raise ValueError(f"source {empty[0]!r} has no training windows; use more data or a shorter data.seq_len.")
        self.names, self.num_windows, self.seed, self.skips = names, num_windows, seed, tuple(skips)
        self.rank, self.world_size, self.start, self.micro_batch_size = rank, world_size, start, micro_batch_size
        self.streams = list(streams) if streams is not None else [source_stream(n) for n in names]
        self.schedule = MixtureSchedule(weights)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        first = 0
        while True:
            positions = rank_positions(self.start, self.rank, self.world_size, self.micro_batch_size, first, self.CHUNK,
                                       self.skips)
            sources, draws = self.schedule.sources(positions)
            windows = np.empty_like(draws)
            for s in np.unique(sources):
                where = sources == s
                windows[where] = stream_windows(draws[where], self.num_windows[s], self.seed, self.streams[s])
            yield from zip(sources.tolist(), windows.tolist(), positions.tolist())
            first += self.CHUNK

    def __len__(self) -> int:  # Lightning treats the loader as unsized when this raises
        raise TypeError("the training stream is infinite")
