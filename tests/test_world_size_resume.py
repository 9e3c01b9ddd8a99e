"""A run stopped on W ranks and resumed on W' (2 -> 1 and 1 -> 2, DDP on CPU with gloo) continues the global order:
every window of an epoch is read exactly once across the stop, in the order of an uninterrupted single process
with the same global batch. Also: masked-LM validation batches on any world size, old per-rank checkpoints, and
sharded checkpoints that cannot be loaded on another world size (mixtures: tests/test_mixture.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from framework.data.datamodule import PackedWindows, PretrainDataModule
from framework.data.position import DATA_ORDER, check_resume_world_size, saved_global_position, upgrade_data_state
from fake_trainer import FakeTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from world_size_worker import fit  # noqa: E402

WORKER = Path(__file__).resolve().parent / "workers" / "world_size_worker.py"
STEPS, STOP, GLOBAL_BATCH = 14, 5, 8  # 112 windows: the 87-window epoch and 25 of the next; stopped after 40


def _overrides(cache: str, tokenizer: str, world: int) -> list[str]:
    return ["model=tiny", "data.max_documents=60", "data.vocab_size=512", "data.seq_len=64", "data.num_proc=1",
            f"data.cache_dir={cache}", f"data.tokenizer_path={tokenizer}", "data.val_windows=4",
            f"data.micro_batch_size={GLOBAL_BATCH // world}", f"trainer.devices={world}",
            f"strategy={'ddp' if world > 1 else 'auto'}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            f"trainer.max_steps={STEPS}", "trainer.val_check_interval=1000", f"callbacks.checkpoint_every_n_steps={STOP}",
            "callbacks.keep_checkpoints=-1", "callbacks.throughput=false", "callbacks.model_card=false",
            "logger.csv=false", "optim.warmup_steps=2", "torch_threads=1"]


def _segment(out: Path, cache: str, tokenizer: str, world: int, resume: str | None = None, stop: int | None = None):
    """One run segment; returns the windows it read in global order (rank blocks side by side, micro-batch by micro-batch)."""
    args = [*(["--resume", resume] if resume else []), *(["--stop-at", str(stop)] if stop else [])]
    if world == 1:
        fit(out, _overrides(cache, tokenizer, 1), resume, stop)
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # Lightning picks a free MASTER_PORT itself
        proc = subprocess.run([sys.executable, str(WORKER), str(out), *args, *_overrides(cache, tokenizer, world)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["world"] == world for r in ranks)
    return [tuple(row) for step in zip(*(r["rows"] for r in ranks)) for _, rows in step for row in rows]


@pytest.fixture(scope="module")
def small_corpus(tiny_prepared, data_cache):
    """60 documents with the tiny corpus's tokenizer: an 87-window epoch, so a test run crosses an epoch."""
    return data_cache, str(tiny_prepared.tokenizer_path)


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    return _segment(tmp_path_factory.mktemp("single"), *small_corpus, world=1)


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_reads_each_window_once(before, after, small_corpus, uninterrupted, compose,
                                                              tmp_path):
    first = _segment(tmp_path / "first", *small_corpus, world=before, stop=STOP)
    ckpt = tmp_path / "first" / "run" / "checkpoints" / f"step{STOP:07d}.ckpt"
    assert torch.load(ckpt, weights_only=True)["PretrainDataModule"]["world_size"] == before
    second = _segment(tmp_path / "second", *small_corpus, world=after, resume=str(ckpt))
    assert len(first) == STOP * GLOBAL_BATCH and len(second) == (STEPS - STOP) * GLOBAL_BATCH
    # the same global order as one process with the same global batch, across the stop
    assert first + second == uninterrupted
    # and that order reads every window of the epoch exactly once (a multiset: two windows may hold equal tokens)
    epoch = _train_windows(compose, small_corpus)
    assert len(epoch) == 87 and Counter((first + second)[: len(epoch)]) == Counter(epoch)


def _train_windows(compose, small_corpus) -> list[tuple]:
    """The epoch's windows, read from the shards in storage order."""
    from framework.config import to_run_config
    from framework.data.prepare import prepare_data

    prepared = prepare_data(to_run_config(compose(_overrides(*small_corpus, 1), tiny=False)).data, progress=False)
    windows = PackedWindows(prepared.shards("train"), prepared.dtype, 65)
    return [tuple(windows[i].tolist()) for i in range(len(windows))]


# ---------------------------------------------------------------------------------------------- fast checks
def test_masked_lm_validation_batches_are_the_same_on_any_world_size(tiny_prepared):
    from framework.data.collators import MLMCollator

    ids = tiny_prepared.special_ids()
    dm = PretrainDataModule(tiny_prepared, window_length=64, micro_batch_size=3, seed=2, val_windows=12,
                            collate_fn=MLMCollator(vocab_size=512, mask_id=ids.mask, special_ids=ids.all))

    def labels_by_window(world: int) -> dict[tuple, tuple]:
        out = {}
        for rank in range(world):
            dm.trainer = FakeTrainer(rank, world)
            (loader,) = dm.val_dataloader()  # one source: one validation loader
            for batch in loader:
                for inputs, labels in zip(batch["input_ids"], batch["labels"]):  # the raw window: labels where selected
                    out[tuple(torch.where(labels >= 0, labels, inputs).tolist())] = tuple(labels.tolist())
        return out

    one, two = labels_by_window(1), labels_by_window(2)
    assert len(one) == 12 and one == two  # the same 12 windows, each masked the same way


def test_old_per_rank_positions_are_converted_or_refused(tiny_prepared):
    old = {"samples_consumed": 40, "seed": 0, "window_length": 65, "tokenizer_hash": tiny_prepared.meta["tokenizer_hash"]}
    dm = PretrainDataModule(tiny_prepared, window_length=65, micro_batch_size=4)
    dm.trainer = FakeTrainer(0, 1)
    checkpoint = {"PretrainDataModule": dict(old), "rng_states": [{}, {}]}  # written by 2 ranks, resumed by 1
    upgrade_data_state(checkpoint)  # what the module's on_load_checkpoint does before the DataModule restores
    with pytest.warns(UserWarning, match="former per-epoch randperm order"):
        dm.load_state_dict(checkpoint["PretrainDataModule"])
    assert dm.global_samples_consumed == 80
    with pytest.warns(UserWarning):  # an old mixture checkpoint's position was already global
        assert saved_global_position({"samples_consumed": 24, "global_position": 48}) == 48
    dm.trainer = FakeTrainer(0, 1)
    with pytest.raises(ValueError, match="not how many ranks wrote it"):
        dm.load_state_dict(old)
    new = {**dm.state_dict(), "global_samples_consumed": 123, "world_size": 3}
    assert new["order"] == DATA_ORDER
    dm.trainer = FakeTrainer(1, 2)
    dm.load_state_dict(new)
    assert dm.global_samples_consumed == 123  # any world size continues at the global position


def test_deepspeed_checkpoint_on_another_world_size_is_refused_before_loading(compose, tmp_path):
    from framework.config import to_run_config
    from framework.run import ConfigurationError, run

    ckpt = tmp_path / "step0000004.ckpt"  # DeepSpeed's layout: latest + <tag>/ with one optimizer partition per rank
    (ckpt / "global_step4").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step4")
    for rank in range(2):
        (ckpt / "global_step4" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    check_resume_world_size(ckpt, 2)  # the same world size passes
    check_resume_world_size(tmp_path / "full.ckpt", 1)  # a single file resumes anywhere
    with pytest.raises(ConfigurationError, match=r"partitioned over 2 ranks, which 1 ranks cannot load.*fw-consolidate"):
        run(to_run_config(compose([f"resume={ckpt}", "trainer.max_steps=1"])), tmp_path / "run")
