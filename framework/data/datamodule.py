"""A resumable, rank-aware DataModule over packed token shards: one source, or a mixture of several
(framework/data/mixture.py); a single source is a mixture of weight 1, so both take the same path.

The token stream of a split is cut into non-overlapping windows of ``window_length`` tokens (the
objective decides the length: ``seq_len + 1`` for causal LM, the pre-corruption length for span
corruption). Training order: one endless GLOBAL stream of samples shared by all ranks. Global position ``p``
reads window ``FeistelPermutation(n, seed, epoch=p // n)(p % n)`` (framework/data/permutation.py: computed per
index, O(1) memory), so epoch ``e`` visits every window once and epochs follow each other without a gap or a
dropped remainder. Micro-batch ``m`` of the whole job (all ``W`` ranks, ``B`` windows each) is global positions
``[m W B, (m + 1) W B)`` and rank ``r`` takes the block ``[m W B + r B, m W B + (r + 1) B)``: the ranks' batches
side by side are the batch one process with ``W B`` windows would read, whatever ``W`` is. With gradient
accumulation ``A`` an optimizer step is ``W B A`` consecutive positions.

A mixture gives each global position to one source (``MixtureSchedule``) and reads that source's own endless stream
(its permutation stream is ``source_stream(name)``; a single source's is 0, its j-th draw is position j).

The position saved in every checkpoint is the number of GLOBAL samples consumed (counted by the DataModule itself,
in ``on_before_batch_transfer``), so a run stopped on ``W`` ranks
resumes on any ``W'`` at the next unread position: across the stop no window of the epoch is read twice or
skipped. Epochs roll over without end; ``trainer.max_steps`` stops training.

Objectives whose batches are random (masked LM, span corruption) get one ``torch.Generator`` per sample, seeded
by (seed, stream, global position): a window is corrupted the same way whether the run was interrupted or not,
on any number of ranks, in whichever DataLoader worker it is collated, and differently each epoch.

Loading for speed (``PretrainDataModule._loader``): pinned host memory when
training on CUDA (so Lightning's host-to-device copy can overlap compute), persistent workers and a
prefetch depth of ``PREFETCH_FACTOR`` batches per worker when ``num_workers > 0``, and ``num_workers=-1``
picks a worker count (``resolve_num_workers``). Every loader is a ``TimedDataLoader``: it counts the
seconds the training process spends blocked in ``next()`` waiting for a batch, which the throughput
callback reports as ``throughput/data_wait_fraction``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from framework.data.mixture import PreparedSources, as_sources
from framework.data.mixture_schedule import MixtureSchedule
# rank_positions and skip_positions are imported from here by the rollback and tests
from framework.data.sampling import MixtureSampler, rank_positions, skip_positions  # noqa: F401
from framework.data.objective_batches import batch_collator, window_length
from framework.data.position import DATA_ORDER, saved_global_position
from framework.data.prepare import PreparedData, open_tokens, shard_token_count


class PackedWindows(Dataset):
    """Window ``i`` of a split: tokens ``[i * window_length, (i + 1) * window_length)`` of the concatenation of the
    split's shards, in order. A window may cross a shard boundary, so how the corpus was cut into shards and
    preparation tasks does not change the windows (a split job's windows equal the one-job run's)."""

    def __init__(self, shards: list[Path], dtype: np.dtype, window_length: int) -> None:
        self.shards, self.dtype, self.window_length = shards, dtype, window_length
        self.offsets = np.cumsum([0] + [shard_token_count(p, dtype) for p in shards])  # (shards + 1,) token offsets
        self._arrays: list[np.ndarray] | None = None  # opened lazily, per worker process

    def __len__(self) -> int:
        return int(self.offsets[-1]) // self.window_length

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, int]:
        """``dataset[i]`` is window i; ``dataset[(i, position)]`` is (window i, position) for seeded collation."""
        if isinstance(key, tuple):
            return self._window(key[0]), key[1]
        return self._window(key)

    def _window(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        if self._arrays is None:
            self._arrays = [open_tokens(p, self.dtype) for p in self.shards]
        start, end = index * self.window_length, (index + 1) * self.window_length
        shard = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pieces = []
        while start < end:  # usually one piece; more when the window crosses shard boundaries
            local = start - int(self.offsets[shard])
            piece = self._arrays[shard][local : local + end - start]
            pieces.append(piece)
            start += len(piece)
            shard += 1
        window = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return torch.from_numpy(window.astype(np.int64))


class SourceWindows(Dataset):
    """``dataset[(source, i, position)]`` = (window i of that source, position) for seeded collation."""

    def __init__(self, parts: list[PackedWindows]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        source, index, position = key
        return self.parts[source][index], position


PREFETCH_FACTOR = 4  # batches each worker keeps ready (DataLoader default: 2)
MAX_AUTO_WORKERS = 8


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask: SLURM's --cpus-per-task, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int, on_cuda: bool, local_devices: int = 1, cpus: int | None = None) -> int:
    """``data.num_workers``, with -1 = auto: on CUDA, each of the node's ``local_devices`` training processes gets
    its share of the usable cores minus one (the process itself, which launches the GPU work), between 1 and
    ``MAX_AUTO_WORKERS``; on CPU, 0 (the cores are busy with the model's own compute, so loading in the main
    process wastes less than workers competing with it)."""
    if num_workers >= 0:
        return num_workers
    if num_workers != -1:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0, or -1 to choose automatically.")
    if not on_cuda:
        return 0
    share = (usable_cpus() if cpus is None else cpus) // max(1, local_devices)
    return max(1, min(MAX_AUTO_WORKERS, share - 1))


class _TimedIterator:
    def __init__(self, iterator: Iterator, loader: "TimedDataLoader") -> None:
        self.iterator, self.loader = iterator, loader

    def __iter__(self) -> "_TimedIterator":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.loader.wait_s += time.perf_counter() - start
            self.loader.batches_fetched += 1

    def __len__(self) -> int:
        return len(self.iterator)

    def __getattr__(self, name: str):  # _MultiProcessingDataLoaderIter's attributes (Lightning reads a few)
        return getattr(self.iterator, name)


class TimedDataLoader(DataLoader):
    """A DataLoader whose iterators add the wall-clock seconds spent inside ``next()`` to ``wait_s``.

    With ``num_workers=0`` that is the whole cost of reading and collating a batch in the training process;
    with workers it is the time the process sat waiting for a worker's batch (zero when the prefetched
    queue is full). Pinning (the pin-memory thread) is included; the host-to-device copy is not (Lightning
    does it after ``next()``). It is host time: with CUDA kernels queued the GPU may still be busy meanwhile,
    so the fraction ``wait_s / step time`` is an upper bound on the GPU's idle time caused by loading."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wait_s = 0.0
        self.batches_fetched = 0

    def __iter__(self) -> _TimedIterator:
        return _TimedIterator(super().__iter__(), self)


class PretrainDataModule(L.LightningDataModule):
    """The run's data: one source or a mixture (``PreparedSources``; a single source is a mixture of weight 1), cut
    into windows, handed out in the global stream order and collated for the objective (``for_objective``).

    It counts its own position (``global_samples_consumed``: every training micro-batch Lightning takes from it, all
    ranks together) and saves it in its checkpoint state. Validation: one loader per source (``val_sources``);
    ``val_windows`` is per source."""

    def __init__(self, prepared: PreparedData | PreparedSources, window_length: int, micro_batch_size: int,
                 collate_fn: Callable | None = None, seed: int = 0, num_workers: int = 0, val_windows: int = 64,
                 seq_len: int | None = None) -> None:
        super().__init__()
        self.prepared = as_sources(prepared)
        self.window_length = window_length
        self.seq_len = seq_len  # the model's sequence length these windows feed (saved with the position)
        self.micro_batch_size = micro_batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.num_workers = num_workers
        self.val_windows = val_windows
        self.names, self.weights = list(self.prepared.names), list(self.prepared.weights)
        self.schedule = MixtureSchedule(self.weights)
        self.global_samples_consumed = 0  # windows consumed by all ranks together; restored from checkpoints
        # (stream position, width) ranges the stream jumps over: data windows a spike-guard rollback skipped
        self.skips: tuple[tuple[int, int], ...] = ()
        self._train_parts, self._val_parts = [], []
        for name in self.names:
            part = self.prepared.parts[name]
            train = PackedWindows(part.shards("train"), part.dtype, window_length)
            val = PackedWindows(part.shards("val"), part.dtype, window_length)
            if len(train) == 0 or len(val) == 0:
                where = f"source {name!r}" if self.prepared.is_mixture else "the data"
                raise ValueError(f"window_length={window_length} tokens leaves {where} {len(train)} training and "
                                 f"{len(val)} validation windows; lower data.seq_len or use more data.")
            self._train_parts.append(train)
            self._val_parts.append(val)

    @classmethod
    def for_objective(cls, prepared: PreparedData | PreparedSources, objective, seq_len: int, micro_batch_size: int,
                      *, document_mask: bool = False, vocab_size: int | None = None, **kwargs) -> PretrainDataModule:
        """The data ``objective`` (an ObjectiveConfig) trains on at model sequence length ``seq_len``: its window
        length and its collator (``framework.data.objective_batches``), from the prepared data's special tokens,
        vocabulary (``vocab_size`` when the model's differs) and tokenizer. ``kwargs``: seed, num_workers,
        val_windows."""
        prepared = as_sources(prepared)
        collate = batch_collator(objective, seq_len, prepared.special_ids(), vocab_size or prepared.vocab_size,
                                 prepared.tokenizer_path, document_mask)
        return cls(prepared, window_length(objective, seq_len), micro_batch_size, collate, seq_len=seq_len, **kwargs)

    @property
    def val_sources(self) -> tuple[tuple[str, float], ...]:
        """(name, weight) of each validation loader, in order: val/loss = sum_i w_i loss_i."""
        return tuple(zip(self.names, self.weights))

    @property
    def source_windows(self) -> dict[str, int]:
        """Training windows consumed from each source by all ranks (host ints, no device sync)."""
        return dict(zip(self.names, self.schedule.counts(self.global_samples_consumed)))

    @property
    def source_epochs(self) -> dict[str, float]:
        """Passes over each source's training windows so far (> 1: the source repeated)."""
        return {n: c / len(p) for (n, c), p in zip(self.source_windows.items(), self._train_parts)}

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _on_cuda(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def loader_kwargs(self, persistent: bool = True) -> dict:
        """Worker, pinning and prefetch settings of every DataLoader this module builds."""
        on_cuda = self._on_cuda()
        trainer = getattr(self, "trainer", None)
        local_devices = trainer.num_devices if trainer is not None else 1
        workers = resolve_num_workers(self.num_workers, on_cuda, local_devices)
        kwargs = dict(num_workers=workers, pin_memory=on_cuda)
        if workers > 0:
            kwargs.update(persistent_workers=persistent, prefetch_factor=PREFETCH_FACTOR)
        return kwargs

    def _loader(self, dataset: Dataset, collate_fn: Callable, *, sampler: Sampler | None = None,
                drop_last: bool = False, persistent: bool = True) -> TimedDataLoader:
        """The one place DataLoaders are built: ``micro_batch_size`` items per batch, in ``sampler``'s order
        (or the dataset's), with ``loader_kwargs``. ``persistent=False`` for loaders used now and then
        (validation): their workers exit after each pass instead of staying resident beside the training loader's."""
        return TimedDataLoader(dataset, batch_size=self.micro_batch_size, sampler=sampler, shuffle=False,
                               collate_fn=collate_fn, drop_last=drop_last, **self.loader_kwargs(persistent))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        # a single source keeps the permutation stream it always had (0); a mixture's sources get their names'
        streams = None if self.prepared.is_mixture else [0]
        sampler = MixtureSampler(self.names, self.weights, [len(p) for p in self._train_parts], self.seed, rank, world,
                                 start=self.global_samples_consumed, micro_batch_size=self.micro_batch_size,
                                 skips=self.skips, streams=streams)
        return self._loader(SourceWindows(self._train_parts), self._collate, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._val_loader(val) for val in self._val_parts]  # val_windows per source

    def _val_loader(self, val: Dataset) -> DataLoader:
        """Rank r evaluates windows r, r + W, ... of the first ``val_windows`` (each collated with the generator of
        its window index, so a window is corrupted alike on any W); every rank gets as many windows (n - n mod W),
        so no rank waits in the final all-reduce for another's extra batch."""
        rank, world = self._rank_world()
        if len(val) < world:
            raise ValueError(f"the validation split has {len(val)} windows, fewer than the {world} ranks; use more "
                             "data, a larger data.val_fraction or a shorter data.seq_len.")
        n = min(self.val_windows, len(val))
        indices = [(i, i) for i in range(rank, n - n % world, world)]  # (window, position = window index)
        return self._loader(torch.utils.data.Subset(val, indices), self._val_collate, persistent=False)

    def _sample_generators(self, stream: int, positions: list[int]) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, stream, global position): training (0) or validation (1),
        whose fixed corruption keeps val/loss comparable across evaluations."""
        return [torch.Generator().manual_seed(hash((self.seed, stream, p)) & 0x7FFF_FFFF_FFFF_FFFF) for p in positions]

    def _collate(self, items: list[tuple[torch.Tensor, int]], stream: int = 0):
        batch = torch.stack([window for window, _ in items])  # (B, window_length)
        if self.collate_fn is None:
            return batch
        return self.collate_fn(batch, generator=self._sample_generators(stream, [p for _, p in items]))

    def _val_collate(self, items: list[tuple[torch.Tensor, int]]):
        return self._collate(items, stream=1)

    # ------------------------------------------------------------------ the position, and resume
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning hook, run on every batch it takes from a loader, right before that batch's step: a training
        micro-batch moves the global position on by all ranks' windows."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.on_micro_batch_consumed()
        return batch

    def on_micro_batch_consumed(self) -> None:
        self.global_samples_consumed += self.micro_batch_size * self._rank_world()[1]

    def state_dict(self) -> dict:
        return {"global_samples_consumed": self.global_samples_consumed, "world_size": self._rank_world()[1],
                "micro_batch_size": self.micro_batch_size, "order": DATA_ORDER, "seed": self.seed,
                "window_length": self.window_length, "seq_len": self.seq_len,
                "tokenizer_hash": self.prepared.meta["tokenizer_hash"], "skips": [list(s) for s in self.skips],
                "mixture": dict(zip(self.names, self.weights)) if self.prepared.is_mixture else None,
                "source_windows": self.source_windows}

    def load_state_dict(self, state: dict) -> None:
        saved, current = state.get("mixture"), dict(zip(self.names, self.weights))
        if saved is not None and not self.prepared.is_mixture:
            raise ValueError(f"this checkpoint was trained on the mixture data.mixture={saved}, not on one source; "
                             "resume with the same data.sources and data.mixture or start a new run (resume=never).")
        if saved is None and self.prepared.is_mixture:
            raise ValueError("this checkpoint was trained on a single source, not a mixture; resume with its data "
                             "settings or start a new run (resume=never).")
        if saved is not None and (set(saved) != set(current) or any(abs(saved[n] - current[n]) > 1e-12 for n in current)):
            raise ValueError(f"this checkpoint was trained with data.mixture={saved}, not {current}; resume with the "
                             "same mixture or start a new run (resume=never).")
        if state.get("tokenizer_hash") not in (None, self.prepared.meta["tokenizer_hash"]):
            raise ValueError("this checkpoint was trained with a different tokenizer/corpus than the configured data; "
                             "resume with the same data settings or start a new run (resume=never).")
        self.global_samples_consumed = saved_global_position(state)
        self.skips = tuple(sorted({tuple(s) for s in state.get("skips", [])} | set(self.skips)))
