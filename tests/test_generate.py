"""Sampling filters against transformers' logits warpers; KV-cached decoding; the fw-generate command."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from framework.generate import (
    apply_temperature,
    fill_mask,
    generate,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from framework.commands.generate import generate_texts as main
from framework.models import ModelConfig, build_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waiting on a shared 2-core machine (~50x slower there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_logits(seed: int, rows: int = 32, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3.0


def assert_same_filtered(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same tokens are removed
    keep = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
def test_temperature_equals_transformers(temperature):
    logits = random_logits(1)
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("top_k", [1, 5, 50, 999])
def test_top_k_equals_transformers(top_k):
    logits = random_logits(2)
    assert_same_filtered(top_k_filter(logits, top_k), TopKLogitsWarper(top_k)(None, logits.clone()))
    assert int((~torch.isinf(top_k_filter(logits, top_k))).sum(-1).max()) == top_k


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.9, 0.99])
def test_top_p_equals_transformers(top_p):
    for seed in range(3):
        logits = random_logits(10 + seed)
        assert_same_filtered(top_p_filter(logits, top_p), TopPLogitsWarper(top_p)(None, logits.clone()))


def test_composed_filters_equal_transformers_pipeline():
    logits = random_logits(3)
    theirs = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(50), TopPLogitsWarper(0.9)])(
        None, logits.clone())
    ours = top_p_filter(top_k_filter(apply_temperature(logits, 0.8), 50), 0.9)
    assert_same_filtered(ours, theirs)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, g, temperature=0.5, top_k=3)
    expected = torch.softmax(torch.tensor([2.0, 1.5, 1.0]) / 0.5, dim=0)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert freq[3:].sum() == 0  # filtered tokens are never drawn
    torch.testing.assert_close(freq[:3], expected, atol=0.015, rtol=0)  # ~4 standard errors at n = 20000
    again = sample_next(logits, torch.Generator().manual_seed(0), temperature=0.5, top_k=3)
    assert torch.equal(draws, again)  # seeded
    assert torch.equal(sample_next(logits[:2], greedy=True), torch.tensor([0, 0]))


def tiny_decoder(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, **overrides)
    return build_model(cfg).eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}])
def test_greedy_with_and_without_kv_cache_gives_identical_tokens(overrides):
    model = tiny_decoder(**overrides)
    prompt = torch.randint(5, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 40, greedy=True, use_cache=True)
    uncached = generate(model, prompt, 40, greedy=True, use_cache=False)
    assert cached.shape == (3, 47)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], prompt)
    # each new token is the argmax of a full forward pass over everything before it
    logits = model(cached[:, :-1])
    assert torch.equal(logits[:, 6:].argmax(-1), cached[:, 7:])


def test_encoder_decoder_greedy_with_and_without_kv_cache_gives_identical_tokens():
    from framework.generate import generate_seq2seq

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("t5-tiny", vocab_size=300)).eval()
    inputs = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    cached = generate_seq2seq(model, inputs, 25, greedy=True, start_id=0, use_cache=True)
    uncached = generate_seq2seq(model, inputs, 25, greedy=True, start_id=0, use_cache=False)
    assert cached.shape == (2, 26) and bool((cached[:, 0] == 0).all())
    assert torch.equal(cached, uncached)
    logits = model(inputs, cached[:, :-1])  # teacher-forced pass over the generated tokens
    assert torch.equal(logits.argmax(-1), cached[:, 1:])


def test_seeded_sampling_is_reproducible_and_stops_at_eos():
    model = tiny_decoder()
    prompt = torch.randint(5, 300, (2, 5), generator=torch.Generator().manual_seed(2))
    knobs = dict(temperature=0.9, top_k=40, top_p=0.95)
    a = generate(model, prompt, 30, generator=torch.Generator().manual_seed(7), **knobs)
    b = generate(model, prompt, 30, generator=torch.Generator().manual_seed(7), use_cache=False, **knobs)
    c = generate(model, prompt, 30, generator=torch.Generator().manual_seed(8), **knobs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    eos = int(a[0, 5])  # pretend the first sampled token is <eos>: row 0 stops and is padded from then on
    d = generate(model, prompt, 30, generator=torch.Generator().manual_seed(7), eos_id=eos, pad_id=0, **knobs)
    assert d[0, 5] == eos and bool((d[0, 6:] == 0).all())


def test_prompt_too_long_is_a_clear_error():
    model = tiny_decoder()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.ones(1, 250, dtype=torch.long), 10, greedy=True)


def test_fill_mask_replaces_only_masked_positions():
    from framework.models.encoder import Encoder

    torch.manual_seed(0)
    model = Encoder(ModelConfig(family="encoder", vocab_size=300, d_model=64, n_layers=2, n_heads=4)).eval()
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 3] = ids[1, 7] = ids[1, 8] = 4
    filled = fill_mask(model, ids, mask_id=4)
    masked = ids == 4
    assert torch.equal(filled[~masked], ids[~masked])
    assert torch.equal(filled[masked], model(ids)[masked].argmax(-1))


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A byte-level BPE with the framework's special tokens, trained in well under a second."""
    from framework.data.tokenizer import save_tokenizer, tokenizer_settings, train_tokenizer

    texts = [f"Return the {w} of the {v} argument, or raise ValueError when it is {u}." for w in
             ("value", "length", "name", "square root", "copy") for v in ("first", "given", "last") for u in
             ("empty", "negative", "None")] * 4
    tok = train_tokenizer(texts, 512)
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tok, directory, tokenizer_settings(512))
    return directory / "tokenizer.json"


def test_generate_command_from_a_checkpoint(tmp_path, small_tokenizer, capsys):
    """A Lightning-format checkpoint plus the run's tokenizer.json: the command rebuilds the model and decodes."""
    from framework.data.tokenizer import load_tokenizer, special_ids
    from framework.objectives.base import module_kwargs
    from framework.objectives.config import ObjectiveConfig, OptimConfig

    tok = load_tokenizer(small_tokenizer)
    special = special_ids(tok)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.get_vocab_size())
    model = build_model(cfg).eval()
    hp = module_kwargs(cfg, OptimConfig(), ObjectiveConfig(), special, 10)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save({"hyper_parameters": hp, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               ckpt_dir / "last.ckpt")
    shutil.copy(small_tokenizer, tmp_path / "run" / "tokenizer.json")

    out = main([str(ckpt_dir / "last.ckpt"), "--prompt", "Return the", "--max-new-tokens", "12", "--greedy"])
    eos = special.eos
    prompt = torch.tensor([[eos] + tok.encode("Return the", add_special_tokens=False).ids])
    expected = generate(model, prompt, 12, greedy=True, eos_id=eos)
    assert out == ["Return the" + tok.decode(expected[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)]
    assert out[0] in capsys.readouterr().out

    knobs = ["--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "0"]
    sampled = main([str(ckpt_dir / "last.ckpt"), "--prompt", "Return the", *knobs])
    again = main([str(ckpt_dir / "last.ckpt"), "--prompt", "Return the", *knobs])
    assert sampled == again and sampled[0].startswith("Return the")


@pytest.mark.parametrize("preset,prompt", [("t5-tiny", "Return the <extra_id_0> of x."),
                                           ("bert-tiny", "Return the <mask> of x.")])
def test_generate_command_for_encoder_decoder_and_encoder_checkpoints(tmp_path, small_tokenizer, preset, prompt):
    from framework.data.tokenizer import load_tokenizer, special_ids
    from framework.generate import fill_mask, generate_seq2seq
    from framework.objectives.base import module_kwargs
    from framework.objectives.config import ObjectiveConfig, OptimConfig

    tok = load_tokenizer(small_tokenizer)
    special = special_ids(tok)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, vocab_size=tok.get_vocab_size())
    model = build_model(cfg).eval()
    hp = module_kwargs(cfg, OptimConfig(), ObjectiveConfig(), special, 10)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    (out,) = main([str(ckpt), "--prompt", prompt, "--max-new-tokens", "6", "--greedy", "--tokenizer",
                   str(small_tokenizer)])
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    if cfg.family == "encoder_decoder":
        assert special.sentinels[0] in ids[0].tolist()  # the sentinel in the prompt is one token
        expected = generate_seq2seq(model, torch.cat([ids, torch.tensor([[special.eos]])], 1), 6, greedy=True,
                                    eos_id=special.eos, start_id=special.pad)
        assert out == tok.decode(expected[0, 1:].tolist(), skip_special_tokens=False).replace("<pad>", "")
    else:
        assert special.mask in ids[0].tolist()
        assert out == tok.decode(fill_mask(model, ids, special.mask)[0].tolist(), skip_special_tokens=True)
        assert "<mask>" not in out
