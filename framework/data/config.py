"""Typed schema for the ``data`` config group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from framework.data.curation import CurationConfig


@dataclass
class SourceSpec:
    """One named source of a mixture (``data.sources.<name>``): a field left unset (None) takes the top-level
    ``data`` value of the same name."""

    source: Optional[str] = None
    paths: Optional[list[str]] = None
    text_field: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: Optional[str] = None
    streaming: Optional[bool] = None
    max_documents: Optional[int] = None
    min_document_chars: Optional[int] = None


@dataclass
class DataConfig:
    # Where the text comes from: "stdlib" (embedded: the Python standard library's docstrings and
    # pydoc topics, present wherever Python is), "files" (``paths``: .txt / .jsonl / .json / .parquet,
    # globs allowed) or "hub" (a ``datasets`` hub name in ``hub_name``).
    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    hub_name: str = ""
    hub_config: str = ""
    hub_split: str = "train"
    streaming: bool = False
    max_documents: int = 0  # 0 = all
    min_document_chars: int = 40
    val_fraction: float = 0.04  # held-out documents, chosen by a stable hash of the document id
    # tokenizer (byte-level BPE trained on the training split)
    vocab_size: int = 8192
    # an existing tokenizer.json to use instead of training one (mixtures share one; continued pretraining
    # must keep its checkpoint's); "" = train one on this source's training split
    tokenizer_path: str = ""
    # preparation
    cache_dir: str = "data_cache"
    num_proc: int = 2
    shard_tokens: int = 50_000_000  # tokens per memory-mapped shard file
    # characters of text per chunk sent to a tokenizer process; at most 2 * num_proc chunks are in flight, which
    # bounds preparation's memory whatever the corpus size (framework.data.prepare_task)
    prepare_chunk_bytes: int = 256_000
    # a mixture (framework.data.mixture): named sources, each prepared into its own shards with one shared
    # tokenizer, sampled by weight in tokens: 'data.sources={legal:{source:files,paths:[...]},general:{}}'
    # 'data.mixture={legal:0.51,general:0.49}'; an empty mixture = the single source configured above
    sources: dict[str, SourceSpec] = field(default_factory=dict)
    mixture: dict[str, float] = field(default_factory=dict)  # source name -> weight (normalised to sum 1)
    # deduplication and quality filters run before tokenization (framework.data.curation); off by default,
    # on with data.curation.enabled=true
    curation: CurationConfig = field(default_factory=CurationConfig)
    # loading
    seq_len: int = 256  # model sequence length; each objective derives its raw window length from it
    micro_batch_size: int = 16  # sequences per device per forward pass
    # DataLoader worker processes per training process; -1 = auto: on CUDA, the process's share of the usable
    # cores minus one, 1..8 (framework.data.datamodule.resolve_num_workers); on CPU, 0
    num_workers: int = -1
    val_windows: int = 64  # validation windows evaluated each time (split across ranks)
