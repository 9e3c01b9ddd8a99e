"""Data mixtures: several named sources, one shared tokenizer, sampled by weight in tokens.

    fw-train 'data.sources={legal:{source:licenses},general:{source:stdlib}}' 'data.mixture={legal:0.51,general:0.49}'

``prepare_sources`` is what training and ``fw-prepare`` call: a single source (``data.mixture`` empty) is
prepared by ``prepare_data`` and becomes a mixture of one source of weight 1, so the DataModule
(framework/data/datamodule.py), its checkpoint state and the per-source metrics take one path.

Preparation of a mixture (``prepare_mixture``): one byte-level BPE tokenizer for all sources (``data.tokenizer_path`` when
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
stream=crc32(name))(j mod n_s)`` (framework/data/permutation.py: O(1) memory; ``MixtureSampler`` in
framework/data/sampling.py); each source rolls over its epochs
independently (a small source repeats: ``source_epochs``).

Resume: the state is the global stream position (all ranks' windows); the per-source counts follow from
it, so a resumed run reads the same windows in the same order as an uninterrupted one, on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from framework.data import tokenizer as tk
from framework.data.config import DataConfig, SourceSpec
from framework.data.prepare import FORMAT_VERSION, PreparedData, PreparedView, _file_lock, _train_texts, prepare_data
from framework.data.curation import curate
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
class PreparedSources(PreparedView):
    """The run's prepared data: named sources sharing one tokenizer, with their weights. A single source
    (``data.mixture`` empty) is one source of weight 1 whose ``meta`` is its own (``is_mixture`` False).

    A mixture's ``meta["val_unigram_entropy_nats"]`` is the mixture-weighted mean of the sources' validation unigram
    entropies, sum_i w_i H_i: the loss of the best context-free model that knows each token's source, the
    baseline for ``val/loss`` (itself the mixture-weighted mean of the per-source losses)."""

    names: list[str]
    weights: list[float]  # normalised, in ``names`` order
    parts: dict[str, PreparedData]
    tokenizer_path: Path
    meta: dict
    is_mixture: bool = True  # data.mixture: checkpoints carry the weights, sources draw from their own streams

    def special_ids(self) -> tk.SpecialIds:
        return next(iter(self.parts.values())).special_ids()


def single_source(prepared: PreparedData, name: str | None = None) -> PreparedSources:
    """One prepared source as a mixture of weight 1 (named ``data.source``, or its cache directory's prefix)."""
    name = name or prepared.directory.name.rsplit("-", 1)[0]
    return PreparedSources([name], [1.0], {name: prepared}, prepared.tokenizer_path, prepared.meta, is_mixture=False)


def as_sources(prepared: PreparedData | PreparedSources) -> PreparedSources:
    return prepared if isinstance(prepared, PreparedSources) else single_source(prepared)


def prepare_sources(cfg: DataConfig, progress: bool = True) -> PreparedSources:
    """The data ``cfg`` configures, prepared (or reused): the mixture ``data.mixture`` names, or the one source."""
    if cfg.mixture:
        return prepare_mixture(cfg, progress)
    return single_source(prepare_data(cfg, progress), cfg.source)


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


def prepare_mixture(cfg: DataConfig, progress: bool = True) -> PreparedSources:
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
    return PreparedSources(names, [weights[n] for n in names], parts, parts[names[0]].tokenizer_path, meta)
