"""Export to transformers: for every family the exported model's logits equal the framework model's (float32)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from framework.data.tokenizer import special_ids, train_tokenizer
from framework.commands.export import main
from framework.export import export_checkpoint
from framework.models import ModelConfig, build_model
from framework.objectives.base import module_kwargs
from framework.objectives.config import ObjectiveConfig, OptimConfig

import transformers  # a dev dependency: missing it is a failure, not a skip


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 50
    tok = train_tokenizer(texts, 512)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights and non-trivial norm gains, so every mapped weight visibly moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "embed.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def _checkpoint(tmp_path, config: ModelConfig, tok, tokenizer_path, seed: int = 0):
    """A file shaped like framework.run's Lightning checkpoints: state_dict under ``model.`` + plain hparams."""
    model = build_model(config).eval()
    _randomize(model, seed)
    # an older checkpoint's hparams also record seq_len and the tokenizer's path (the export still reads the path)
    hparams = {**module_kwargs(config, OptimConfig(), ObjectiveConfig(), special_ids(tok), max_steps=1), "seq_len": 64,
               "tokenizer_path": str(tokenizer_path)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams,
                "global_step": 1}, path)
    return path, model


CASES = [
    ("decoder", "tiny", {}, "LlamaForCausalLM", "AutoModelForCausalLM"),
    ("decoder-gqa-untied", "tiny", dict(n_kv_heads=2, tie_embeddings=False, rope_theta=500.0), "LlamaForCausalLM",
     "AutoModelForCausalLM"),
    ("encoder", "bert-tiny", {}, "EuroBertForMaskedLM", "AutoModelForMaskedLM"),
    ("encoder-gqa-untied", "bert-tiny", dict(n_kv_heads=1, tie_embeddings=False, head_dim=32), "EuroBertForMaskedLM",
     "AutoModelForMaskedLM"),
    ("t5-v1.1", "t5-tiny", dict(n_decoder_layers=3), "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("t5-tied", "t5-tiny", dict(tie_embeddings=True, relative_attention_num_buckets=8,
                                relative_attention_max_distance=20), "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
]


@pytest.mark.parametrize("case,preset,overrides,architecture,auto_class", CASES, ids=[c[0] for c in CASES])
def test_exported_logits_equal_framework_logits(case, preset, overrides, architecture, auto_class, tokenizer_file,
                                                tmp_path):
    path, tok = tokenizer_file
    config = ModelConfig.from_name(preset, vocab_size=tok.get_vocab_size(), **overrides)
    ckpt, ours = _checkpoint(tmp_path, config, tok, path, seed=len(case))
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    hf = getattr(transformers, auto_class).from_pretrained(out).eval()
    assert type(hf).__name__ == architecture and hf.dtype == torch.float32
    assert sum(p.numel() for p in hf.parameters()) == config.num_parameters()

    g = torch.Generator().manual_seed(0)
    V = tok.get_vocab_size()
    ids = torch.randint(105, V, (2, 40), generator=g)
    with torch.no_grad():
        if config.family == "decoder":
            expected, got = ours(ids), hf(input_ids=ids).logits
        elif config.family == "encoder":
            mask = torch.ones_like(ids)
            mask[1, 25:] = 0  # padding in the second row
            expected, got = ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
        else:
            mask = torch.ones_like(ids)
            mask[1, 25:] = 0
            target = torch.randint(105, V, (2, 17), generator=g)
            target[:, 0] = 0  # decoder starts with <pad>, T5's decoder_start_token_id
            expected = ours(ids, target, mask)
            got = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    assert expected.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_writes_tokenizer_and_generation_settings(tokenizer_file, tmp_path, capsys):
    path, tok = tokenizer_file
    config = ModelConfig.from_name("t5-tiny", vocab_size=tok.get_vocab_size())
    ckpt, ours = _checkpoint(tmp_path, config, tok, path)
    main([str(ckpt), str(tmp_path / "out")])  # the fw-export command line
    assert "T5ForConditionalGeneration" in capsys.readouterr().out
    out = tmp_path / "out"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.mask_token_id) == (0, 2, 4)
    assert hf_tok.convert_tokens_to_ids("<extra_id_0>") == 5 and hf_tok.convert_tokens_to_ids("<extra_id_99>") == 104
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["feed_forward_proj"] == "gated-silu" and config_json["decoder_start_token_id"] == 0
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert hf.generation_config.decoder_start_token_id == 0 and hf.generation_config.eos_token_id == 2
    # greedy generation in transformers follows the framework model's argmax step by step
    src = torch.tensor([tok.encode(text).ids])
    generated = hf.generate(src, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        decoder_ids = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(6):
            next_id = ours(src, decoder_ids)[:, -1].argmax(-1, keepdim=True)
            decoder_ids = torch.cat([decoder_ids, next_id], dim=1)
    assert generated.tolist() == decoder_ids.tolist()


def test_export_errors_name_the_fix(tokenizer_file, tmp_path):
    path, tok = tokenizer_file
    config = ModelConfig.from_name("tiny", vocab_size=tok.get_vocab_size())
    ckpt, _ = _checkpoint(tmp_path, config, tok, tmp_path / "moved" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert export_checkpoint(ckpt, tmp_path / "out", tokenizer_path=path) == tmp_path / "out"
    # a run directory keeps a copy of its tokenizer beside checkpoints/: found without the recorded path
    run_ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_ckpt.parent.mkdir(parents=True)
    ckpt.rename(run_ckpt)
    (tmp_path / "run" / "tokenizer.json").write_bytes(path.read_bytes())
    assert export_checkpoint(run_ckpt, tmp_path / "out_run") == tmp_path / "out_run"
    with pytest.raises(ValueError, match="sharded checkpoint directory"):
        export_checkpoint(tmp_path, tmp_path / "out2")
    gqa_t5 = ModelConfig.from_name("t5-tiny", vocab_size=tok.get_vocab_size(), n_kv_heads=2)
    ckpt, _ = _checkpoint(tmp_path, gqa_t5, tok, path)
    with pytest.raises(ValueError, match="grouped-query"):
        export_checkpoint(ckpt, tmp_path / "out3")
