"""Sources, tokenizer, shard preparation and the resumable rank-aware sampler."""

import json
import os

import numpy as np
import pytest
import torch

from framework.data.config import DataConfig
from framework.data.datamodule import MixtureSampler, PackedWindows, PretrainDataModule
from framework.data.prepare import open_tokens, prepare_data, unigram_entropy
from framework.data.embedded import stdlib_documents
from framework.data.sources import is_validation, iter_documents
from framework.data.tokenizer import NUM_SENTINELS, SPECIAL_TOKENS
from fake_trainer import FakeTrainer


def test_embedded_corpus_is_real_text():
    docs = []
    for i, doc in enumerate(stdlib_documents()):
        docs.append(doc)
        if i == 300:
            break
    assert len(docs) == 301
    text = " ".join(t for _, t in docs)
    words = text.split()
    assert len(words) > 5000
    # English prose: the most common English function words are frequent
    for w in ("the", "of", "a", "is"):
        assert words.count(w) > 50


def test_special_tokens_sit_at_fixed_ids(tiny_prepared):
    tok = tiny_prepared.tokenizer()
    ids = tiny_prepared.special_ids()
    assert (ids.pad, ids.bos, ids.eos, ids.unk, ids.mask) == (0, 1, 2, 3, 4)
    assert ids.sentinels == tuple(range(5, 5 + NUM_SENTINELS))
    assert tok.id_to_token(5) == "<extra_id_0>" and tok.id_to_token(104) == "<extra_id_99>"
    assert tok.get_vocab_size() == 512
    # special tokens survive a round trip as single tokens
    assert tok.encode("<mask>", add_special_tokens=False).ids == [4]


def test_shards_hold_each_document_followed_by_eos(tiny_prepared, compose):
    from framework.config import to_run_config

    cfg = to_run_config(compose()).data
    tok = tiny_prepared.tokenizer()
    meta = tiny_prepared.meta
    assert meta["dtype"] == "uint16"
    train = np.concatenate([np.asarray(open_tokens(p, tiny_prepared.dtype)) for p in tiny_prepared.shards("train")])
    val = np.concatenate([np.asarray(open_tokens(p, tiny_prepared.dtype)) for p in tiny_prepared.shards("val")])
    assert len(train) == meta["tokens"]["train"] and len(val) == meta["tokens"]["val"]
    expected_train, expected_val = [], []
    for doc_id, text in iter_documents(cfg):
        ids = tok.encode(text, add_special_tokens=False).ids + [2]
        (expected_val if is_validation(doc_id, cfg.val_fraction) else expected_train).extend(ids)
    assert train.tolist() == expected_train
    assert val.tolist() == expected_val
    assert int((train == 2).sum()) == meta["documents"]["train"]
    # and decoding the first document gives back its text
    first_doc = tok.decode(train[: int(np.argmax(train == 2))].tolist())
    assert first_doc == next(t for d, t in iter_documents(cfg) if not is_validation(d, cfg.val_fraction))


def test_validation_entropy_matches_its_definition(tiny_prepared):
    val = np.concatenate([np.asarray(open_tokens(p, tiny_prepared.dtype)) for p in tiny_prepared.shards("val")])
    p = np.bincount(val) / len(val)
    p = p[p > 0]
    assert tiny_prepared.meta["val_unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert unigram_entropy(np.array([1, 1, 2, 0])) == pytest.approx(-(2 * 0.25 * np.log(0.25) + 0.5 * np.log(0.5)))


def test_preparing_twice_reuses_tokenizer_and_shards(tiny_prepared, compose):
    from framework.config import to_run_config

    before = {p: os.stat(p).st_mtime_ns for p in [tiny_prepared.tokenizer_path, *tiny_prepared.shards("train")]}
    again = prepare_data(to_run_config(compose()).data, progress=False)
    assert again.directory == tiny_prepared.directory and again.meta == tiny_prepared.meta
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_local_files_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(60)))
    (tmp_path / "b.txt").write_text("plain text file " * 40)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt")], vocab_size=512,
                     cache_dir=str(tmp_path / "cache"), num_proc=1, val_fraction=0.2)
    docs = list(iter_documents(cfg))
    assert len(docs) == 61 and docs[-1][1].startswith("plain text file")
    prepared = prepare_data(cfg, progress=False)
    assert prepared.meta["documents"]["train"] + prepared.meta["documents"]["val"] == 61


def test_a_given_tokenizer_is_used_not_retrained(tiny_prepared, tmp_path):
    """data.tokenizer_path: another corpus is tokenized with exactly the given tokenizer's ids."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"the module number {i} returns a list " * 5})
                                                for i in range(40)))
    cfg = DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")], tokenizer_path=str(tiny_prepared.tokenizer_path),
                     cache_dir=str(tmp_path / "cache"), num_proc=1, val_fraction=0.2)
    prepared = prepare_data(cfg, progress=False)
    given = tiny_prepared.tokenizer()
    assert prepared.meta["tokenizer_hash"] == tiny_prepared.meta["tokenizer_hash"]
    assert prepared.tokenizer().get_vocab() == given.get_vocab()
    first_doc = [d for d in iter_documents(cfg) if not is_validation(d[0], cfg.val_fraction)][0][1]
    expected = given.encode(first_doc, add_special_tokens=False).ids
    stream = open_tokens(prepared.shards("train")[0], prepared.dtype)
    assert stream[: len(expected)].tolist() == expected
    bad = tmp_path / "plain.json"
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE()).save(str(bad))
    with pytest.raises(ValueError, match="has no <eos> token that the clm objective needs"):  # nothing may be added
        prepare_data(DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")], tokenizer_path=str(bad),
                                cache_dir=str(tmp_path / "cache2"), num_proc=1, val_fraction=0.2,
                                tokenizer_add_tokens=False), progress=False)
    assert not (tmp_path / "cache2").exists() or not list((tmp_path / "cache2").rglob("meta.json"))


def test_bad_data_settings_are_refused_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "missing*.jsonl")])))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "x" * 100}) + "\n")
    with pytest.raises(KeyError, match="data.text_field"):
        list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "x.jsonl")])))
    with pytest.raises(ValueError, match="too small"):
        prepare_data(DataConfig(vocab_size=100, cache_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="data.source"):
        list(iter_documents(DataConfig(source="ftp")))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _merged_ranks(n, seed, world, micro_batch, micro_batches, start=0):
    """All ranks' samples ((window, position) pairs) of ``micro_batches`` micro-batches, rank blocks side by side."""
    streams = [iter(MixtureSampler(["one"], [1.0], [n], seed, rank, world, start=start, micro_batch_size=micro_batch,
                                   streams=[0])) for rank in range(world)]
    return [item[1:] for _ in range(micro_batches) for s in streams for item in _take(s, micro_batch)]


def test_sampler_order_is_seeded_rank_disjoint_and_resumable():
    n = 103
    single = _merged_ranks(n, 7, world=1, micro_batch=6, micro_batches=50)  # 300 samples: 2.9 epochs
    assert [p for _, p in single] == list(range(300))  # positions are global
    assert single == _merged_ranks(n, 7, world=1, micro_batch=6, micro_batches=50)  # deterministic
    assert single != _merged_ranks(n, 8, world=1, micro_batch=6, micro_batches=50)  # seed matters
    windows = [w for w, _ in single]
    for epoch in range(2):  # every epoch visits each window once, in a new order; no remainder dropped
        assert sorted(windows[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert windows[:n] != windows[n : 2 * n]
    # 2 or 3 ranks with micro-batch 2 (or 3 ranks x 2) read, rank blocks side by side, the single stream
    assert _merged_ranks(n, 7, world=2, micro_batch=3, micro_batches=50) == single
    assert _merged_ranks(n, 7, world=3, micro_batch=2, micro_batches=50) == single
    # resuming at any global position on any world size continues the uninterrupted stream exactly
    for start, world, micro_batch in ((0, 2, 3), (13, 1, 6), (102, 2, 1), (103, 3, 5), (150, 2, 4)):
        resumed = _merged_ranks(n, 7, world, micro_batch, micro_batches=120 // (world * micro_batch), start=start)
        assert resumed == single[start : start + len(resumed)]


def test_sampler_needs_constant_memory_at_any_corpus_size():
    """10^12 windows (a ~10^15-token corpus): a randperm would need 8 TB; the sampler allocates one chunk."""
    import tracemalloc

    sampler = iter(MixtureSampler(["one"], [1.0], [10**12], seed=1, rank=1, world_size=8, micro_batch_size=4))
    tracemalloc.start()
    try:
        taken = [window for _, window, _ in _take(sampler, 3 * MixtureSampler.CHUNK)]  # numpy's allocations too
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(set(taken)) == len(taken) and max(taken) < 10**12
    assert peak < 4 * 2**20, peak  # bytes: a few chunk-sized arrays and the Python ints taken


def test_datamodule_state_restores_the_position(tiny_prepared):
    dm = PretrainDataModule(tiny_prepared, window_length=65, micro_batch_size=4, seed=3)
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(6)]
    for _ in range(3):
        dm.on_micro_batch_consumed()
    state = dm.state_dict()
    dm2 = PretrainDataModule(tiny_prepared, window_length=65, micro_batch_size=4, seed=3)
    dm2.load_state_dict(state)
    resumed = next(iter(dm2.train_dataloader()))
    assert torch.equal(resumed, batches[3])
    assert batches[0].shape == (4, 65) and batches[0].dtype == torch.long


def test_datamodule_counts_training_batches_it_hands_out(tiny_prepared):
    """The position moves with every training micro-batch Lightning takes (all ranks' windows), not with
    validation batches; it is saved with the sequence length, and a single source is a weight-1 source."""
    from framework.objectives.config import ObjectiveConfig

    dm = PretrainDataModule.for_objective(tiny_prepared, ObjectiveConfig(name="clm"), 64, micro_batch_size=4, seed=3)
    dm.trainer = FakeTrainer(1, 2)
    dm.trainer.training = True
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_before_batch_transfer(batch, 0) is batch and dm.global_samples_consumed == 8
    dm.trainer.training = False  # a validation batch inside fit
    dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    assert state["global_samples_consumed"] == 8 and state["seq_len"] == 64 and state["window_length"] == 65
    assert state["mixture"] is None and dm.val_sources == ((dm.names[0], 1.0),)
    assert state["source_windows"] == {dm.names[0]: 8}


def test_windows_are_cut_from_the_concatenated_shards(tmp_path):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    np.arange(10, dtype=np.uint16).tofile(a)
    np.arange(0, dtype=np.uint16).tofile(b)  # an empty shard is skipped
    np.arange(100, 107, dtype=np.uint16).tofile(c)
    ds = PackedWindows([a, b, c], np.dtype(np.uint16), 3)
    assert len(ds) == 17 // 3
    assert [ds[i].tolist() for i in range(5)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 100, 101], [102, 103, 104]]
    with pytest.raises(IndexError):
        ds[5]


def test_special_token_list_layout():
    assert SPECIAL_TOKENS[:5] == ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"] and len(SPECIAL_TOKENS) == 105


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_source_through_load_dataset(tmp_path, streaming):
    # load_dataset accepts a local directory as the dataset name: the same code path as a hub name, offline
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    (ds_dir / "train.jsonl").write_text("\n".join(json.dumps({"content": f"record {i} " * 30}) for i in range(25)))
    cfg = DataConfig(source="hub", hub_name=str(ds_dir), hub_split="train", text_field="content",
                     streaming=streaming, max_documents=20)
    docs = list(iter_documents(cfg))
    assert len(docs) == 20
    assert docs[3][1].startswith("record 3 ")
    assert docs[0][0] != docs[1][0]  # distinct, stable ids drive the validation split


def test_random_collation_is_reproducible_after_resume_and_differs_per_batch(tiny_prepared):
    """Masked-LM batches depend on (seed, global stream position) only: a resumed loader masks exactly as the
    uninterrupted one did, also in a DataLoader worker process, and a window is masked alike in any batch."""
    from framework.data.collators import MLMCollator

    ids = tiny_prepared.special_ids()
    collate = MLMCollator(vocab_size=512, mask_id=ids.mask, special_ids=ids.all)

    def loader(start, workers=0):
        dm = PretrainDataModule(tiny_prepared, window_length=64, micro_batch_size=4, collate_fn=collate, seed=5,
                                num_workers=workers)
        dm.global_samples_consumed = start
        return iter(dm.train_dataloader())

    straight = [next(it) for it in [loader(0)] for _ in range(5)]
    resumed = [next(it) for it in [loader(8, workers=1)] for _ in range(3)]  # 2 batches of 4 consumed
    for a, b in zip(straight[2:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # different batches get different masks (not one fixed pattern)
    masks = [(b["labels"] != -100) for b in straight]
    assert not torch.equal(masks[0], masks[1])
    # one sample's mask is its own: 2 ranks x 2 windows (or 1 x 4 from position 2) mask each window as 1 x 4 did
    dm = PretrainDataModule(tiny_prepared, window_length=64, micro_batch_size=2, collate_fn=collate, seed=5)
    for rank in range(2):
        dm.trainer = FakeTrainer(rank, 2)
        half = next(iter(dm.train_dataloader()))
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(half["input_ids"], straight[0]["input_ids"][rows])
        assert torch.equal(half["labels"], straight[0]["labels"][rows])
