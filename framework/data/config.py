"""Typed schema for the ``data`` config group."""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.data.curation import CurationConfig


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
    # deduplication and quality filters run before tokenization (framework.data.curation); off by default,
    # on with data.curation.enabled=true
    curation: CurationConfig = field(default_factory=CurationConfig)
    # loading
    seq_len: int = 256  # model sequence length; each objective derives its raw window length from it
    micro_batch_size: int = 16  # sequences per device per forward pass
    num_workers: int = 0
    val_windows: int = 64  # validation windows evaluated each time (split across ranks)
