"""Typed schema for the ``data`` config group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from framework.choices import DataSource, Objective
from framework.data.curation import CurationConfig


@dataclass
class SourceSpec:
    """One named source of a mixture (``data.sources.<name>``): a field left unset (None) takes the top-level
    ``data`` value of the same name."""

    source: Optional[DataSource] = None
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
    # pydoc topics, present wherever Python is), "files" (``paths``: .txt / .md / .jsonl / .json / .parquet, text
    # and JSON optionally .gz/.zst/.bz2/.xz, directories of them or written by datasets' save_to_disk, globs
    # allowed) or "hub" (a ``datasets`` hub name in ``hub_name``, or a local save_to_disk / Parquet directory).
    source: DataSource = "stdlib"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    hub_name: str = ""
    hub_config: str = ""
    hub_split: str = "train"
    streaming: bool = False
    max_documents: int = 0  # 0 = all
    min_document_chars: int = 40
    # a .txt/.md file is cut into documents of at most this many characters: blank-line-separated paragraphs
    # grouped in order, a longer paragraph cut at whitespace (framework.data.readers.text_documents), so one big
    # file (a book, a dump) gives the validation split documents; ~2.5k tokens, a long web page
    text_document_chars: int = 10_000
    val_fraction: float = 0.04  # held-out documents, chosen by a stable hash of the document id
    # tokenizer (byte-level BPE trained on the training split)
    vocab_size: int = 4096  # the embedded corpora are small (conf/data/files.yaml and hub.yaml set 8192)
    # an existing tokenizer.json to use instead of training one (mixtures share one; continued pretraining
    # must keep its checkpoint's); "" = train one on this source's training split
    tokenizer_path: str = ""
    # a given tokenizer (tokenizer.json, or a directory saved by transformers) gets the special tokens this
    # objective needs appended when it lacks them (framework.data.tokenizer.OBJECTIVE_ROLES); conf/train.yaml
    # sets it from objective.name
    special_tokens_for: Objective = "clm"
    # false: a given tokenizer is used exactly as it is, and one missing a needed special token is refused
    tokenizer_add_tokens: bool = True
    # bytes of training text (UTF-8, in source order) the framework's own tokenizer is trained on: BPE learns
    # merges from word counts, whose ranking is settled long before 1 GB (an 8-32k vocabulary is learnt from
    # ~1 GB in practice), and the trainer's memory grows with the text it is fed; the embedded corpora
    # (about 2 and 4 MB) are far below it
    tokenizer_train_bytes: int = 1_000_000_000
    # preparation
    cache_dir: str = "data_cache"
    # how preparation tokenizes (framework.data.prepare_task): 0 = in this process, the tokenizer's Rust thread
    # pool on every usable core while a thread reads ahead (the fastest; TOKENIZERS_PARALLELISM is left false
    # after, for processes forked later); 1 = in this process, single-threaded; N >= 2 = N forked processes
    num_proc: int = 0
    shard_tokens: int = 50_000_000  # tokens per memory-mapped shard file
    # characters of text per chunk the tokenizer encodes in one call; at most 9 chunks (num_proc 0) or 2 * num_proc
    # (N >= 2) are in flight, which bounds preparation's memory whatever the corpus size
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
    # attention only within each packed document (block-causal / block-diagonal) and rotary positions restarting
    # at each document (framework/models/document_mask.py); off = attend across the whole window
    document_mask: bool = False
    # DataLoader worker processes per training process; -1 = auto: on CUDA, the process's share of the usable
    # cores minus one, 1..8 (framework.data.datamodule.resolve_num_workers); on CPU, 0
    num_workers: int = -1
    val_windows: int = 64  # validation windows evaluated each time (split across ranks)
