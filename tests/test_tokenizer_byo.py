"""Bring your own tokenizer: GPT-2's real 50,257-token BPE, as a package on PyPI ships it.

The ranks come from the ``openai-whisper`` source distribution (``whisper/assets/gpt2.tiktoken``, 50,256
byte-level BPE ranks without ``<|endoftext|>``), turned into a ``tokenizer.json`` by transformers'
``TikTokenConverter``; nothing about the tokenizer is written by this project. It lacks every special token,
so each objective's tokens are appended after id 50255.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.data.config import DataConfig
from framework.data.prepare import open_tokens, prepare_data
from framework.data.prepare_task import MIN_VAL_DOCUMENTS
from framework.data.sources import is_validation, iter_documents
from framework.data.tokenizer import NUM_SENTINELS

WHISPER = "20250625"  # openai-whisper release whose sdist holds whisper/assets/gpt2.tiktoken
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's regex


@pytest.fixture(scope="session")
def gpt2_ranks(tmp_path_factory) -> Path:
    """whisper/assets/gpt2.tiktoken from the openai-whisper sdist on PyPI (downloaded once per session)."""
    directory = tmp_path_factory.mktemp("whisper")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
           f"openai-whisper=={WHISPER}", "-d", str(directory)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("PyPI unreachable: pip download openai-whisper timed out")
    if done.returncode != 0:
        pytest.skip(f"PyPI unreachable: pip download openai-whisper failed: {done.stderr.strip()[-200:]}")
    sdist = next(directory.glob("openai_whisper-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        (directory / "gpt2.tiktoken").write_bytes(tar.extractfile(member).read())
    return directory / "gpt2.tiktoken"


@pytest.fixture(scope="session")
def gpt2_dir(gpt2_ranks) -> Path:
    """The ranks as a transformers-style directory holding tokenizer.json (GPT-2's pre-tokenizer regex)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(gpt2_ranks), pattern=GPT2_PATTERN).converted()
    directory = gpt2_ranks.parent / "gpt2"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Real English prose present wherever Python is: 60 of pydoc's help topics (about 300 kB), one per line."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    path.write_text("\n".join(json.dumps({"text": topics[k]}) for k in sorted(topics)[:60]))
    return path


def _cfg(tmp_path, tokenizer_path, objective: str, corpus: Path) -> DataConfig:
    return DataConfig(source="files", paths=[str(corpus)], tokenizer_path=str(tokenizer_path),
                      special_tokens_for=objective, cache_dir=str(tmp_path / "cache"), num_proc=1, val_fraction=0.1)


def _expected_train_stream(cfg: DataConfig, encode, eos: int) -> np.ndarray:
    """The training stream the split rule gives: hash-chosen training documents, each encoded + <eos>; when fewer
    than MIN_VAL_DOCUMENTS documents are hash-chosen for validation, the stream's tail joins validation so that it
    holds val_fraction of the tokens (framework.data.prepare_task)."""
    parts: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for doc_id, text in iter_documents(cfg):
        parts[is_validation(doc_id, cfg.val_fraction)].append(np.array(encode(text) + [eos]))
    train = np.concatenate(parts[False])
    val_tokens = sum(len(a) for a in parts[True])
    if len(parts[True]) < MIN_VAL_DOCUMENTS:
        take = min(max(math.ceil(cfg.val_fraction * (len(train) + val_tokens)) - val_tokens, 0), len(train) - 1)
        train = train[: len(train) - take]
    return train


def test_gpt2_clm_shards_are_tiktokens_gpt2_ids(gpt2_ranks, gpt2_dir, tmp_path, corpus):
    """Every training token equals tiktoken's own GPT-2 encoding of the documents, <eos> appended at 50256."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    cfg = _cfg(tmp_path, gpt2_dir, "clm", corpus)
    prepared = prepare_data(cfg, progress=False)
    ids = prepared.special_ids()
    assert ids.eos == 50256 and prepared.vocab_size == 50257 and prepared.dtype == np.uint16
    assert ids.pad == ids.bos == ids.unk == ids.mask == 50256 and ids.sentinels == ()  # clm adds only <eos>
    assert prepared.meta["special_tokens"]["added_tokens"] == ["<eos>"]
    assert prepared.meta["special_tokens"]["eos"] == {"token": "<eos>", "id": 50256, "added": True,
                                                      "aliased_to_eos": False}
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(gpt2_ranks)),
                            special_tokens={})
    expected = _expected_train_stream(cfg, enc.encode_ordinary, 50256)
    stream = np.concatenate([open_tokens(p, prepared.dtype) for p in prepared.shards("train")])
    assert stream.tolist() == expected.tolist()
    assert enc.encode_ordinary("Hello world")[:2] == [15496, 995]  # GPT-2's published ids
    from framework.tracking.model_card import describe_data, tokenizer_lines

    card = tokenizer_lines(describe_data(cfg, prepared.meta)["tokenizer"])
    assert card[0] == f"- tokenizer: given ({gpt2_dir})"
    assert card[1] == "- special tokens: eos `<eos>` 50256 (added), pad = eos, bos = eos, unk = eos, mask = eos"


def _module(prepared, objective: str, family_preset: str):
    from framework.models import ModelConfig
    from framework.objectives import objective_class
    from framework.objectives.base import module_kwargs
    from framework.objectives.config import ObjectiveConfig, OptimConfig

    config = ModelConfig.from_name(family_preset, vocab_size=prepared.vocab_size)
    return objective_class(objective)(**module_kwargs(config, OptimConfig(), ObjectiveConfig(name=objective),
                                                      prepared.special_ids(), 1))


def _collator(prepared, objective: str):
    from framework.data.objective_batches import batch_collator
    from framework.objectives.config import ObjectiveConfig

    return batch_collator(ObjectiveConfig(name=objective), 64, prepared.special_ids(), prepared.vocab_size,
                          prepared.tokenizer_path)


def _windows(prepared, n: int, length: int) -> torch.Tensor:
    """(n, length) consecutive windows of the training stream."""
    stream = open_tokens(prepared.shards("train")[0], prepared.dtype)
    return torch.from_numpy(stream[: n * length].astype(np.int64)).view(n, length)


@pytest.fixture(scope="module")
def mlm_prepared(gpt2_dir, corpus, tmp_path_factory):
    return prepare_data(_cfg(tmp_path_factory.mktemp("mlm"), gpt2_dir, "mlm", corpus), progress=False)


def test_gpt2_mlm_batches_use_the_added_mask(mlm_prepared):
    prepared = mlm_prepared
    ids = prepared.special_ids()
    assert (ids.eos, ids.pad, ids.mask) == (50256, 50257, 50258) and prepared.vocab_size == 50259
    assert prepared.tokenizer().token_to_id("<mask>") == 50258
    module = _module(prepared, "mlm", "bert-tiny")
    windows = _windows(prepared, 16, 64)
    batch = _collator(prepared, "mlm")(windows.clone())
    inputs = batch["input_ids"]
    original = windows
    masked = inputs == 50258
    assert masked.sum() > 0 and (original[masked] != 50258).all()  # <mask> written over real tokens
    assert inputs.max() <= 50258  # random replacements come from the vocabulary, never an unknown id
    eos_positions = original == 50256
    assert (inputs[eos_positions] == 50256).all()  # <eos> is never selected


def test_gpt2_span_corruption_batches_use_the_added_sentinels(gpt2_dir, tmp_path, corpus):
    prepared = prepare_data(_cfg(tmp_path, gpt2_dir, "span_corruption", corpus), progress=False)
    ids = prepared.special_ids()
    assert (ids.eos, ids.pad) == (50256, 50257)
    assert ids.sentinels == tuple(range(50258, 50258 + NUM_SENTINELS)) and prepared.vocab_size == 50358
    assert prepared.meta["special_tokens"]["sentinels"]["added"] == NUM_SENTINELS
    module = _module(prepared, "span_corruption", "t5-tiny")
    from framework.data.objective_batches import window_length
    from framework.objectives.config import ObjectiveConfig

    window = window_length(ObjectiveConfig(name="span_corruption"), 64)
    batch = _collator(prepared, "span_corruption")(_windows(prepared, 8, window))
    inputs, labels = batch["input_ids"], batch["labels"]
    assert (inputs == 50258).any(dim=1).all() and (labels[:, 0] == 50258).all()  # <extra_id_0> opens each target
    assert set(labels[labels >= 50257].tolist()) <= set(ids.sentinels)  # no <pad>, no id beyond the vocabulary


def test_gpt2_export_loads_in_transformers_with_the_same_ids(mlm_prepared, tmp_path):
    """fw-export of an MLM model trained with GPT-2 + added tokens: AutoTokenizer gives the framework's ids."""
    import transformers

    from framework.export import export_checkpoint
    from framework.models import build_model

    prepared = mlm_prepared
    module = _module(prepared, "mlm", "bert-tiny")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in build_model(module.model_config).state_dict().items()},
                "hyper_parameters": dict(module.hparams), "global_step": 1}, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "hf", tokenizer_path=prepared.tokenizer_path)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    text = "The tokenizer of <mask> returns a list.<eos>"
    ours = prepared.tokenizer().encode(text, add_special_tokens=False).ids
    assert hf(text, add_special_tokens=False)["input_ids"] == ours and 50258 in ours and ours[-1] == 50256
    assert (hf.mask_token, hf.mask_token_id, hf.pad_token_id, hf.eos_token_id) == ("<mask>", 50258, 50257, 50256)
    model = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.mask_token_id == 50258 and model.config.pad_token_id == 50257


def test_a_vocabulary_over_65536_uses_uint32_shards(tmp_path):
    """70,000 words + the appended <eos> (id 70000): shards are uint32 and hold the word ids unchanged. No document
    is hash-chosen for validation at val_fraction 0.05, so validation is the training stream's tail."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    rng = np.random.default_rng(0)
    docs = [rng.integers(60_000, 70_000, size=50) for _ in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": " ".join(words[i] for i in d)}) for d in docs))
    cfg = DataConfig(source="files", paths=[str(tmp_path / "docs.jsonl")], tokenizer_path=str(tmp_path / "words.json"),
                     cache_dir=str(tmp_path / "cache"), num_proc=1, val_fraction=0.05)
    prepared = prepare_data(cfg, progress=False)
    assert prepared.dtype == np.uint32 and prepared.vocab_size == 70_001 and prepared.special_ids().eos == 70_000
    stream = np.concatenate([open_tokens(p, prepared.dtype) for p in prepared.shards("train")])
    expected = _expected_train_stream(cfg, lambda t: tok.encode(t).ids, 70_000)
    assert stream.tolist() == expected.tolist() and stream.max() >= 65_536
    val = np.concatenate([open_tokens(p, prepared.dtype) for p in prepared.shards("val")])
    assert len(val) == math.ceil(0.05 * 40 * 51)  # 40 documents of 50 words + <eos>: the tail moved to validation
    assert np.concatenate([stream, val]).tolist() == [t for d in docs for t in d.tolist() + [70_000]]


def test_bad_tokenizers_are_one_sentence_and_leave_no_cache(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match="is not a tokenizer.json the `tokenizers` library can read"):
        prepare_data(_cfg(tmp_path, bad, "clm", tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        prepare_data(_cfg(tmp_path, tmp_path / "nowhere", "clm", tmp_path), progress=False)
    assert not (tmp_path / "cache").exists()


def test_sentencepiece_style_tokens_are_found_by_name_not_added():
    """A Unigram (SentencePiece-style) tokenizer with T5's <pad> </s> <unk>: those ids are used, only the rest added."""
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    from framework.data.tokenizer import add_missing_special_tokens, special_ids

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(["the licence grants permission to copy, modify and distribute"] * 50, vocab_size=60,
                           special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tok = sp._tokenizer
    pad, eos, unk = (tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>"))
    size = tok.get_vocab_size()
    clm, added = add_missing_special_tokens(tok, "clm", True)
    assert added == [] and special_ids(clm).eos == eos and special_ids(clm).pad == pad and special_ids(clm).unk == unk
    mlm, added = add_missing_special_tokens(tok, "mlm", True)
    ids = special_ids(mlm)
    assert added == ["<mask>"] and (ids.eos, ids.pad, ids.mask, ids.bos) == (eos, pad, size, eos)
    t5, added = add_missing_special_tokens(tok, "span_corruption", True)
    assert len(added) == NUM_SENTINELS and special_ids(t5).sentinels == tuple(range(size, size + NUM_SENTINELS))
    assert tok.get_vocab_size() == size  # the given tokenizer itself is not modified
    with pytest.raises(ValueError, match="has no <mask> token that the mlm objective needs"):
        add_missing_special_tokens(tok, "mlm", False)
