"""Data mixtures: several named sources, one shared tokenizer, sampled by weight in tokens.

    fw-train 'data.sources={legal:{source:licenses},general:{source:stdlib}}' 'data.mixture={legal:0.51,general:0.49}'

Preparation (``prepare_mixture``): one byte-level BPE tokenizer for all sources (``data.tokenizer_path`` when
given, else trained on the union of the sources' training documents and kept in
``<cache_dir>/mixture-<key>/tokenizer.json``), then each source is prepared into its own shards by
``prepare_data`` with that tokenizer, so token ids mean the same in every source.

Sampling (``MixtureSchedule``): every window has the same length, so a share of windows is a share of
tokens. Global sample position ``n`` (all ranks' samples; rank ``r`` of ``W`` with micro-batch ``B`` takes block
``r`` of every ``W B`` positions, as in framework/data/datamodule.py) is given to a source by Tijdeman's rule
for the chairman assignment problem (R. Tijdeman, "The chairman assignment problem", Discrete Mathematics 32, 1980): among the sources whose
deficit ``w_i n - c_i`` is at least ``delta = 1 / (2k - 2)`` (``k`` sources of positive weight, ``c_i`` the
windows already given to source ``i``), the one whose deficit would first reach ``1 - delta``. It
guarantees, at EVERY prefix of ``n`` windows,

    |c_i(n) - w_i n| <= 1 - 1 / (2k - 2)  windows      (1/2 for two sources, 3/4 for three; < 1 always)

with the normalised weights taken as integers over 10^6 (exact for weights of up to six decimals, else each
within 1e-6), so the rule runs in exact integer arithmetic, the same on every rank. With integer weights the
sequence is periodic (``MixtureSchedule``), so the source of any position and every source's count at it
are O(1) look-ups. Within a source, its j-th draw is window ``FeistelPermutation(n_s, seed, j // n_s,
stream=crc32(name))(j mod n_s)`` (framework/data/permutation.py: O(1) memory); each source rolls over its epochs
independently (a small source repeats: ``source_epochs``).

Resume: the state is the global stream position (all ranks' windows); the per-source counts follow from
it, so a resumed run reads the same windows in the same order as an uninterrupted one, on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from framework.data import tokenizer as tk
from framework.data.config import DataConfig, SourceSpec
from framework.data.datamodule import PackedWindows, PretrainDataModule, rank_positions
from framework.data.prepare import FORMAT_VERSION, PreparedData, PreparedView, _file_lock, _train_texts, prepare_data
from framework.data.curation import curate
from framework.data.mixture_schedule import MixtureSchedule
from framework.data.permutation import stream_windows
from framework.data.sources import iter_documents, source_fingerprint

# ----------------------------------------------------------------------------- configuration
def mixture_weights(cfg: DataConfig) -> dict[str, float]:
    """``data.mixture`` normalised to sum 1, in its given order; refuses what cannot be a mixture."""
    if not cfg.mixture:
        raise ValueError("data.mixture is empty; give 'data.mixture={name:weight,...}' naming sources in data.sources.")
    missing = [name for name in cfg.mixture if name not in cfg.sources]
    if missing:
        raise ValueError(f"data.mixture names {missing} which data.sources does not define (it has "
                         f"{sorted(cfg.sources)}); add 'data.sources={{{missing[0]}:{{source:...}}}}' or fix the name.")
    negative = {name: w for name, w in cfg.mixture.items() if not float(w) >= 0.0}
    if negative:
        raise ValueError(f"data.mixture weights must be >= 0, got {negative}; give each source a non-negative weight.")
    total = sum(float(w) for w in cfg.mixture.values())
    if total <= 0.0:
        raise ValueError("data.mixture weights are all zero; give at least one source a positive weight.")
    return {name: float(w) / total for name, w in cfg.mixture.items()}


def source_config(cfg: DataConfig, name: str) -> DataConfig:
    """The single-source DataConfig of ``data.sources.<name>``: its set fields over the top-level ones."""
    spec = cfg.sources[name]
    fields = dataclasses.asdict(spec) if isinstance(spec, SourceSpec) else dict(spec or {})
    unknown = set(fields) - {f.name for f in dataclasses.fields(SourceSpec)}
    if unknown:
        raise ValueError(f"data.sources.{name} has unknown fields {sorted(unknown)}; a source takes "
                         f"{[f.name for f in dataclasses.fields(SourceSpec)]}.")
    overrides = {k: v for k, v in fields.items() if v is not None}
    if "paths" in overrides:
        overrides["paths"] = list(overrides["paths"])
    return replace(cfg, sources={}, mixture={}, **overrides)


# ----------------------------------------------------------------------------- preparation
@dataclass
class PreparedMixture(PreparedView):
    """What ``PreparedData`` offers train.py, for several sources sharing one tokenizer.

    ``meta["val_unigram_entropy_nats"]`` is the mixture-weighted mean of the sources' validation unigram
    entropies, sum_i w_i H_i: the loss of the best context-free model that knows each token's source, the
    baseline for ``val/loss`` (itself the mixture-weighted mean of the per-source losses)."""

    names: list[str]
    weights: list[float]  # normalised, in ``names`` order
    parts: dict[str, PreparedData]
    tokenizer_path: Path
    meta: dict

    def special_ids(self) -> tk.SpecialIds:
        return next(iter(self.parts.values())).special_ids()


def mixture_key(cfg: DataConfig, names: list[str]) -> str:
    """Identifies the shared tokenizer: the sources' texts, the tokenizer settings and curation (when on)."""
    identity = {"sources": {n: source_fingerprint(source_config(cfg, n)) for n in sorted(names)},
                "tokenizer": tk.tokenizer_settings(cfg.vocab_size, cfg.tokenizer_train_bytes), "format": FORMAT_VERSION}
    if cfg.curation.enabled:
        identity["curation"] = dataclasses.asdict(cfg.curation)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _shared_tokenizer(cfg: DataConfig, names: list[str], progress: bool) -> Path:
    """``data.tokenizer_path``, or a BPE trained once on the union of the sources' training documents."""
    if cfg.tokenizer_path:
        return Path(cfg.tokenizer_path).expanduser().resolve()
    directory = Path(cfg.cache_dir).expanduser().resolve() / f"mixture-{mixture_key(cfg, names)}"
    path = directory / tk.TOKENIZER_FILE
    with _file_lock(directory.parent / f".{directory.name}.lock"):
        if path.exists():
            return path
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.time()

        def union() -> Iterator[str]:  # sorted by name: the tokenizer does not depend on the mixture's order
            for name in sorted(names):
                source = source_config(cfg, name)
                # the documents prepare_data will keep: curated (when on) as each source's own tokenizer would be
                curation = curate(iter_documents(source), cfg.curation) if cfg.curation.enabled else None
                yield from _train_texts(source, None, curation)

        tok = tk.train_tokenizer(tk.bounded_texts(union(), cfg.tokenizer_train_bytes), cfg.vocab_size)
        tk.save_tokenizer(tok, directory, {**tk.tokenizer_settings(cfg.vocab_size, cfg.tokenizer_train_bytes),
                                           "sources": sorted(names)})
        if progress:
            print(f"mixture tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens from {len(names)} sources, "
                  f"trained in {time.time() - t0:.1f}s -> {path}")
        return path


def prepare_mixture(cfg: DataConfig, progress: bool = True) -> PreparedMixture:
    """One tokenizer for all sources of ``data.mixture``, then each source's own shards (reused when present)."""
    weights = mixture_weights(cfg)
    names = list(weights)
    tokenizer_path = _shared_tokenizer(cfg, names, progress)
    parts = {name: prepare_data(replace(source_config(cfg, name), tokenizer_path=str(tokenizer_path)), progress)
             for name in names}
    hashes = {part.meta["tokenizer_hash"] for part in parts.values()}
    assert len(hashes) == 1, f"mixture sources were tokenized differently: {hashes}"
    first = parts[names[0]].meta
    meta = {
        "mixture": weights,
        "tokenizer_hash": first["tokenizer_hash"],
        "vocab_size": first["vocab_size"],
        "special_ids": first["special_ids"],
        "special_tokens": first.get("special_tokens"),
        "dtype": first["dtype"],
        "documents": {s: sum(p.meta["documents"][s] for p in parts.values()) for s in ("train", "val")},
        "tokens": {s: sum(p.meta["tokens"][s] for p in parts.values()) for s in ("train", "val")},
        "val_unigram_entropy_nats": sum(weights[n] * parts[n].meta["val_unigram_entropy_nats"] for n in names),
        "sources": {n: {"directory": str(parts[n].directory), "weight": weights[n],
                        **{k: parts[n].meta[k] for k in ("documents", "tokens", "val_unigram_entropy_nats")}}
                    for n in names},
    }
    # the sources' copy: a given tokenizer there has the special tokens the objective needed appended
    return PreparedMixture(names, [weights[n] for n in names], parts, parts[names[0]].tokenizer_path, meta)


def source_stream(name: str) -> int:
    """The permutation stream of source ``name``: sources sharing a seed get unrelated orders."""
    return zlib.crc32(name.encode())


class MixtureSampler(Sampler):
    """Rank ``rank`` of ``world_size``'s share of the mixture's global stream from GLOBAL position ``start``, in
    blocks of ``micro_batch_size`` (``rank_positions``); yields ``(source, window, global position)``."""

    CHUNK = 4096  # samples computed per vectorised call

    def __init__(self, names: list[str], weights: list[float], num_windows: list[int], seed: int, rank: int,
                 world_size: int, start: int = 0, micro_batch_size: int = 1, skips: tuple = ()) -> None:
        self.names, self.num_windows, self.seed, self.skips = names, num_windows, seed, tuple(skips)
        self.rank, self.world_size, self.start, self.micro_batch_size = rank, world_size, start, micro_batch_size
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
                windows[where] = stream_windows(draws[where], self.num_windows[s], self.seed,
                                                source_stream(self.names[s]))
            yield from zip(sources.tolist(), windows.tolist(), positions.tolist())
            first += self.CHUNK

    def __len__(self) -> int:
        raise TypeError("the training stream is infinite")


class MixtureWindows(Dataset):
    """``dataset[(source, i, position)]`` = (window i of that source, position) for seeded collation."""

    def __init__(self, parts: list[PackedWindows]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        source, index, position = key
        return self.parts[source][index], position


# ----------------------------------------------------------------------------- the DataModule
class MixtureDataModule(PretrainDataModule):
    """``PretrainDataModule``'s surface (same loaders, collation, resume hooks) over a ``PreparedMixture``.

    Validation: one loader per source (``val_names``, ``val_weights``); ``val_windows`` is per source."""

    is_mixture = True

    def __init__(self, prepared: PreparedMixture, window_length: int, micro_batch_size: int, collate_fn=None,
                 seed: int = 0, num_workers: int = 0, val_windows: int = 64) -> None:
        L.LightningDataModule.__init__(self)
        self.prepared = prepared
        self.window_length, self.micro_batch_size, self.collate_fn = window_length, micro_batch_size, collate_fn
        self.seed, self.num_workers, self.val_windows = seed, num_workers, val_windows
        self.names, self.weights = list(prepared.names), list(prepared.weights)
        self.global_samples_consumed = 0  # windows consumed by all ranks together; restored from checkpoints
        self.skips: tuple[tuple[int, int], ...] = ()  # stream ranges a spike-guard rollback skipped
        self.schedule = MixtureSchedule(self.weights)
        self._train_parts, self._val_parts = [], []
        for name in self.names:
            part = prepared.parts[name]
            train = PackedWindows(part.shards("train"), part.dtype, window_length)
            val = PackedWindows(part.shards("val"), part.dtype, window_length)
            if len(train) == 0 or len(val) == 0:
                raise ValueError(f"window_length={window_length} tokens leaves source {name!r} {len(train)} training "
                                 f"and {len(val)} validation windows; lower data.seq_len or give it more documents.")
            self._train_parts.append(train)
            self._val_parts.append(val)

    @property
    def val_names(self) -> list[str]:
        return self.names

    @property
    def val_weights(self) -> list[float]:
        return self.weights

    @property
    def source_windows(self) -> dict[str, int]:
        """Training windows consumed from each source by all ranks (host ints, no device sync)."""
        return dict(zip(self.names, self.schedule.counts(self.global_samples_consumed)))

    @property
    def source_epochs(self) -> dict[str, float]:
        """Passes over each source's training windows so far (> 1: the source repeated)."""
        return {n: c / len(p) for (n, c), p in zip(self.source_windows.items(), self._train_parts)}

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = MixtureSampler(self.names, self.weights, [len(p) for p in self._train_parts], self.seed, rank, world,
                                 start=self.global_samples_consumed, micro_batch_size=self.micro_batch_size,
                                 skips=self.skips)
        return self._loader(MixtureWindows(self._train_parts), self._collate, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._val_loader(val) for val in self._val_parts]  # val_windows per source

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {**super().state_dict(), "mixture": dict(zip(self.names, self.weights)),
                "source_windows": self.source_windows}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("mixture")
        if saved is None:
            raise ValueError("this checkpoint was trained on a single source, not a mixture; resume with its data "
                             "settings or start a new run (resume=never).")
        current = dict(zip(self.names, self.weights))
        if set(saved) != set(current) or any(abs(saved[n] - current[n]) > 1e-12 for n in current):
            raise ValueError(f"this checkpoint was trained with data.mixture={saved}, not {current}; resume with the "
                             "same mixture or start a new run (resume=never).")
        super().load_state_dict(state)  # the global position: the same stream on any world size


class MixtureTokensLogger(L.Callback):
    """Logs ``train/tokens_seen/<source>`` (all ranks' input tokens drawn from each source) on the steps the
    loggers write: windows per source (host counters of the schedule) x input tokens per window."""

    def __init__(self) -> None:
        self.tokens_per_window: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, MixtureDataModule):
            return
        if self.tokens_per_window is None:
            self.tokens_per_window = pl_module.batch_tokens(batch) // dm.micro_batch_size
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:  # the step's metrics are not written
            return
        for name, windows in dm.source_windows.items():
            pl_module.log(f"train/tokens_seen/{name}", float(windows * self.tokens_per_window), on_step=True,
                          on_epoch=False)


def mixture_metrics(results: list[dict], dm: MixtureDataModule, trainer: L.Trainer) -> dict:
    """Per-source entries of final_metrics.json from ``trainer.validate``'s results (one dict per val
    dataloader; Lightning suffixes a dataloader's metrics with ``/dataloader_idx_<i>``) and the schedule."""
    out: dict = {}
    for i, name in enumerate(dm.names):
        row = results[i] if i < len(results) else {}
        out[f"val_loss_nats/{name}"] = float(row.get(f"val/{name}/loss/dataloader_idx_{i}",
                                                     row.get(f"val/{name}/loss", float("nan"))))
    logger = next((c for c in trainer.callbacks if isinstance(c, MixtureTokensLogger)), None)
    if logger is not None and logger.tokens_per_window:
        out.update({f"tokens_seen/{n}": w * logger.tokens_per_window for n, w in dm.source_windows.items()})
    out.update({f"epochs/{n}": round(e, 4) for n, e in dm.source_epochs.items()})
    return out
