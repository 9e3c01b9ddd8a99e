"""Shared fixtures: a tiny prepared corpus and Hydra composition of ``conf/``.

Tests train tiny models on a slice of the embedded stdlib corpus (800 documents, 512-token vocab);
the slice is prepared once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# tiny models: one thread is faster than two (no sync overhead) and keeps 2-process tests off each other's cores
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# Overrides that make any run tiny: a small slice of the corpus, a tiny model, short sequences.
TINY = [
    "model=tiny",
    "data.max_documents=800",
    "data.vocab_size=512",
    "data.seq_len=64",
    "data.micro_batch_size=8",
    "data.num_proc=1",
    "data.val_windows=16",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "optim.warmup_steps=5",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def compose(data_cache):
    """compose(overrides) -> the composed DictConfig of conf/train.yaml (tiny by default)."""
    from framework.config import compose_config

    def _compose(overrides: list[str] = (), tiny: bool = True):
        base = (TINY + [f"data.cache_dir={data_cache}"]) if tiny else []
        return compose_config(base + list(overrides))

    return _compose


@pytest.fixture(scope="session")
def train_config(data_cache):
    """train_config(overrides) -> the TrainConfig fw-train would run (tiny by default), via framework.config.compose."""
    from framework.config import compose

    def _train_config(overrides: list[str] = (), tiny: bool = True):
        base = (TINY + [f"data.cache_dir={data_cache}"]) if tiny else []
        return compose(base + list(overrides))

    return _train_config


@pytest.fixture(scope="session")
def tiny_prepared(compose):
    from framework.config import to_run_config
    from framework.data.prepare import prepare_data

    return prepare_data(to_run_config(compose()).data, progress=False)
