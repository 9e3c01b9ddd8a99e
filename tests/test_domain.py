"""The legal-domain corpus, tokenizer extension, vocabulary transfer, init_from, and the domain-adaptation recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.adapt import (
    adapt_checkpoint, evaluate_split, load_init_weights, module_from_checkpoint, token_bytes, transfer_vocabulary,
)
from framework.config import to_run_config
from framework.data.config import DataConfig
from framework.data.embedded import license_documents, license_fingerprint
from framework.data.sources import iter_documents
from framework.data.tokenizer import SPECIAL_TOKENS, extend_tokenizer, special_ids, tokenizer_hash, train_tokenizer
from framework.models import ModelConfig
from framework.objectives import objective_class
from framework.objectives.base import module_kwargs

HAS_LICENSES = Path("/usr/share/common-licenses").is_dir() and Path("/usr/share/doc").is_dir()
needs_licenses = pytest.mark.skipif(not HAS_LICENSES, reason="needs a Debian/Ubuntu /usr/share/doc")


# ----------------------------------------------------------------------------- the licenses source
def _fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    common, doc = tmp_path / "common-licenses", tmp_path / "doc"
    common.mkdir()
    (common / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE Version 3 " * 3)
    (common / "GPL").symlink_to("GPL-3")  # as Debian ships it: the same text twice
    for package, text in [("zlib", "Copyright: Jean-loup Gailly. License: Zlib " * 2),
                          ("apt", "Format: DEP-5\n\nFiles: *\nLicense: GPL-2+\n" * 3),
                          ("apt-utils", "Format: DEP-5\n\nFiles: *\nLicense: GPL-2+\n" * 3),  # same source package
                          ("tiny", "short")]:
        (doc / package).mkdir(parents=True)
        (doc / package / "copyright").write_text(text)
    (doc / "no-copyright").mkdir()
    return common, doc


def test_license_documents_whole_files_deduplicated_in_stable_order(tmp_path):
    common, doc = _fake_tree(tmp_path)
    docs = list(license_documents(40, str(common), str(doc)))
    # symlinked GPL and apt-utils's copy of apt's file are yielded once, under the first path; "short" is < 40 chars
    assert [d for d, _ in docs] == ["licenses:common-licenses/GPL", "licenses:doc/apt", "licenses:doc/zlib"]
    assert docs[1][1] == (doc / "apt" / "copyright").read_text()  # the whole file is one document
    assert docs == list(license_documents(40, str(common), str(doc)))
    fp = license_fingerprint(str(common), str(doc))
    assert len(fp) == 6 and (str(doc / "zlib" / "copyright"), (doc / "zlib" / "copyright").stat().st_size) in fp


def test_license_documents_missing_directories_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Debian/Ubuntu system's /usr/share/doc; use data.source=files"):
        list(license_documents(40, str(tmp_path / "none"), str(tmp_path / "none")))


@needs_licenses
def test_licenses_source_dispatch_on_this_machine():
    docs = list(iter_documents(DataConfig(source="licenses", max_documents=20)))
    assert len(docs) == 20 and len({d for d, _ in docs}) == 20
    assert all(d.startswith("licenses:") for d, _ in docs) and len({t for _, t in docs}) == 20


# ----------------------------------------------------------------------------- tokenizer extension
@pytest.fixture(scope="module")
def base_tok():
    return train_tokenizer(["hello world, hello there"] * 50, 512)


def test_extend_tokenizer_hand_computed(base_tok):
    V = base_tok.get_vocab_size()
    base_segments = [t.value for t in base_tok.model.tokenize("hellozq")]
    assert base_segments == ["hello", "z", "q"]
    # pairs (hello, z) and (z, q) both seen 5 times: the tie goes to the smaller pair; then (helloz, q)
    ext = extend_tokenizer(base_tok, ["hellozq"] * 5, num_new_tokens=2)
    assert ext.token_to_id("helloz") == V and ext.token_to_id("hellozq") == V + 1 and ext.get_vocab_size() == V + 2
    spec, base_spec = json.loads(ext.to_str())["model"], json.loads(base_tok.to_str())["model"]
    assert spec["merges"][: len(base_spec["merges"])] == base_spec["merges"]
    assert spec["merges"][len(base_spec["merges"]):] == [["hello", "z"], ["helloz", "q"]]
    assert ext.encode("hellozq").ids == [V + 1]
    assert ext.encode("hellozz").ids == [V, base_tok.token_to_id("z")]
    # a pair seen once is below min_frequency=2: no token
    assert extend_tokenizer(base_tok, ["hellozq"], num_new_tokens=2).get_vocab_size() == V


def test_extend_tokenizer_keeps_ids_and_base_tokenization(tiny_prepared):
    import numpy as np

    base = tiny_prepared.tokenizer()  # 512 tokens trained on 800 stdlib documents
    ids = np.fromfile(tiny_prepared.shards("val")[0], dtype=tiny_prepared.dtype).astype(np.int64)
    eos = tiny_prepared.special_ids().eos
    general = [base.decode(doc.tolist()) for doc in np.split(ids, np.flatnonzero(ids == eos) + 1)[:40] if len(doc) > 1]
    domain = ["Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
              f"(licence {i}), to deal in the Software without restriction." for i in range(40)]
    ext = extend_tokenizer(base, domain, num_new_tokens=30)
    V, ext_vocab = base.get_vocab_size(), ext.get_vocab()
    assert ext.get_vocab_size() == V + 30
    assert all(ext_vocab[token] == i for token, i in base.get_vocab().items())  # every id kept
    assert special_ids(ext) == special_ids(base) and [ext.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(105))
    new_ids = set(range(V, V + 30))
    # every new merge fires on the domain text: its token is in the encoding, or a later new merge consumed it
    new_merges = json.loads(ext.to_str())["model"]["merges"][-30:]
    consumed = {ext.token_to_id(piece) for pair in new_merges for piece in pair}
    assert new_ids <= {i for text in domain for i in ext.encode(text).ids} | consumed
    assert sum(len(ext.encode(t).ids) for t in domain) < 0.8 * sum(len(base.encode(t).ids) for t in domain)
    unchanged = 0
    for text in general:
        b, e = base.encode(text), ext.encode(text)
        assert ext.decode(e.ids) == text
        # a coarsening: every boundary of the extended tokenization is a boundary of the base's
        assert {s for s, _ in e.offsets} <= {s for s, _ in b.offsets}
        if not new_ids & set(e.ids):
            assert e.ids == b.ids
            unchanged += 1
    assert unchanged >= 5


# ----------------------------------------------------------------------------- vocabulary transfer
def _checkpoint(tmp_path: Path, preset: str, objective: str, tok, record_tokenizer: bool = False,
                **model_overrides) -> tuple[Path, object]:
    from framework.objectives.config import ObjectiveConfig, OptimConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, vocab_size=tok.get_vocab_size(), **model_overrides)
    module = objective_class(objective)(**module_kwargs(cfg, OptimConfig(), ObjectiveConfig(name=objective),
                                                        special_ids(tok), 10))
    path = tmp_path / f"{preset}-{len(list(tmp_path.glob('*.ckpt')))}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
               | ({"tokenizer_hash": tokenizer_hash(tok)} if record_tokenizer else {}), path)
    return path, module.model


@pytest.mark.parametrize("preset,objective,tied", [("tiny", "clm", True), ("bert-tiny", "mlm", False),
                                                   ("t5-tiny", "span_corruption", False)])
def test_transfer_copies_known_rows_and_averages_pieces(tmp_path, base_tok, preset, objective, tied):
    ext = extend_tokenizer(base_tok, ["hellozq"] * 5, num_new_tokens=2)
    V = base_tok.get_vocab_size()
    ckpt, old = _checkpoint(tmp_path, preset, objective, base_tok, tie_embeddings=tied)
    hp, new = adapt_checkpoint(ckpt, base_tok, ext, tmp_path / "init.ckpt", tmp_path / "tokenizer.json")
    assert hp["model_config"]["vocab_size"] == V + 2
    hello, z, q = (base_tok.token_to_id(t) for t in ("hello", "z", "q"))
    for name in ("embed", "lm_head"):
        o, n = getattr(old, name).weight.detach(), getattr(new, name).weight.detach()
        assert torch.equal(n[:V], o[:V])  # every old token copies its row
        assert torch.allclose(n[V], (o[hello] + o[z]) / 2)  # "helloz": the old tokenizer's pieces hello + z
        assert torch.allclose(n[V + 1], (o[hello] + o[z] + o[q]) / 3)
        assert torch.allclose(n[V + 2:], o[V:].mean(0).expand_as(n[V + 2:]))  # padding rows: old padding mean
    assert (new.lm_head.weight is new.embed.weight) == tied
    # the same model on old-vocabulary text: identical logits over the old vocabulary
    ids = torch.tensor([base_tok.encode("hello world, hello there hello").ids])
    args = (ids, ids) if preset == "t5-tiny" else (ids,)
    with torch.no_grad():
        assert torch.allclose(new.eval()(*args)[..., :V], old.eval()(*args)[..., :V], atol=1e-5)
    reloaded = module_from_checkpoint(tmp_path / "init.ckpt").model
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), new.state_dict().values()))


def test_token_pieces_of_a_new_tokenizer_spell_each_token(base_tok):
    from framework.adapt import token_pieces

    new = train_tokenizer(["Licensed under the Apache License, Version 2.0; hello world"] * 30, 512)
    pieces = token_pieces(new, base_tok)
    assert len(pieces) == new.get_vocab_size()
    for token_id, ids in enumerate(pieces):
        token = new.id_to_token(token_id)
        assert "".join(base_tok.id_to_token(i) for i in ids) == token  # the old pieces spell the same bytes
        assert (len(ids) == 1) == (token in base_tok.get_vocab())
    assert pieces[:105] == [[i] for i in range(105)]  # special tokens map to themselves


def test_recipe_refuses_a_missing_base(tmp_path):
    from recipes.domain_adapt import main

    with pytest.raises(SystemExit, match="no checkpoint at .*train the base first"):
        main(["--base", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit, match="directory without checkpoints/"):
        main(["--base", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "out")])


def test_transfer_vocabulary_rejects_wrong_piece_count():
    cfg = ModelConfig.from_name("tiny", vocab_size=300)
    with pytest.raises(ValueError, match="token pieces"):
        transfer_vocabulary({}, cfg, cfg, [[0]] * 10)


def test_token_bytes_counts_utf8_bytes(base_tok):
    lengths = token_bytes(base_tok)
    ids = base_tok.encode("hello wörld").ids
    assert lengths[ids].sum() == len("hello wörld".encode()) and lengths[0] == 0


# ----------------------------------------------------------------------------- init_from
def test_evaluation_is_the_mean_loss_and_nats_per_byte_counts_the_evaluated_text(tiny_prepared):
    """loss_nats is the token-weighted mean of compute_loss over the evaluated windows; nats/byte divides it by
    the UTF-8 bytes per token of exactly those windows (decoded here independently of token_bytes)."""
    from framework.objectives.config import ObjectiveConfig, OptimConfig

    torch.manual_seed(0)
    tok = tiny_prepared.tokenizer()
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.get_vocab_size())
    module = objective_class("clm")(**module_kwargs(cfg, OptimConfig(), ObjectiveConfig(name="clm"),
                                                    tiny_prepared.special_ids(), 10))
    result = evaluate_split(module, tiny_prepared, 32, micro_batch_size=4, max_windows=12)
    from framework.data.prepare import open_tokens

    first_shard = open_tokens(tiny_prepared.shards("val")[0], tiny_prepared.dtype)
    stream = torch.from_numpy(first_shard[: 12 * 33].astype("int64")).view(12, 33)  # the first 12 windows
    with torch.no_grad():
        losses = [module.compute_loss(stream[i : i + 4]) for i in range(0, 12, 4)]
    expected = sum(float(l) * int(n) for l, n in losses) / sum(int(n) for _, n in losses)
    assert result["windows"] == 12 and result["tokens"] == 12 * 32
    assert result["loss_nats"] == pytest.approx(expected, rel=1e-6)
    text_bytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for row in stream)
    assert result["nats_per_byte"] == pytest.approx(expected / (text_bytes / stream.numel()), rel=0.01)


def test_init_from_loads_exactly_and_refuses_mismatches(compose, tiny_prepared, tmp_path):
    from framework.run import ConfigurationError, build_run, run

    tok = tiny_prepared.tokenizer()
    ckpt, saved = _checkpoint(tmp_path, "tiny", "clm", tok, record_tokenizer=True)
    _, module, _, _ = build_run(to_run_config(compose([f"init_from={ckpt}"])), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(module.model.state_dict().values(), saved.state_dict().values()))
    _, fresh, _, _ = build_run(to_run_config(compose(["seed=7"])), tmp_path / "b")
    assert not torch.equal(fresh.model.embed.weight, saved.embed.weight)

    (tmp_path / "extended").mkdir()
    ext_ckpt, _ = _checkpoint(tmp_path / "extended", "tiny", "clm", extend_tokenizer(tok, ["hellozq"] * 5, 2))
    with pytest.raises(ConfigurationError, match=r"vocabulary has 514 tokens, the data's tokenizer 512: use the "
                                                 r"checkpoint's tokenizer with data.tokenizer_path="):
        run(to_run_config(compose([f"init_from={ext_ckpt}"])), tmp_path / "c")
    cfg = ModelConfig.from_name("tiny", vocab_size=512)
    with pytest.raises(ValueError, match="holds a encoder_decoder model but this run trains a decoder"):
        load_init_weights(saved, cfg, _checkpoint(tmp_path, "t5-tiny", "span_corruption", tok)[0])
    with pytest.raises(ValueError, match="does not fit the configured model"):
        load_init_weights(saved, cfg, _checkpoint(tmp_path, "tiny", "clm", tok, d_model=32, n_heads=2)[0])
    with pytest.raises(ValueError, match="another tokenizer of the same size"):
        load_init_weights(saved, cfg, ckpt, tokenizer_hash="0123456789abcdef")
    with pytest.raises(ValueError, match="fw-consolidate"):
        load_init_weights(saved, cfg, tmp_path)


# ----------------------------------------------------------------------------- the recipe, end to end
@needs_licenses
@pytest.mark.slow
def test_domain_recipe_end_to_end(compose, data_cache, tmp_path, capsys):
    from framework.run import run
    from recipes.domain_adapt import main

    base = tmp_path / "base"
    run(to_run_config(compose(["trainer.max_steps=40", "trainer.val_check_interval=40", "optim.lr=3e-3",
                               "callbacks.throughput=false", "callbacks.model_card=false"])), base)
    results = main(["--base", str(base), "--out", str(tmp_path / "out"), "--new-tokens", "32", "--max-documents",
                    "80", "--steps", "30", "--lr", "3e-3", "--micro-batch", "8", "--val-windows", "16",
                    "--cache-dir", data_cache, "--num-proc", "1", "--",
                    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "callbacks.throughput=false"])
    for when in ("base", "before", "after"):
        for split in ("domain", "general"):
            assert results[when][split]["tokens"] > 0 and 0 < results[when][split]["loss_nats"] < 10
    assert results["vocab_size"] == 512 + 32 and results["train_metrics"]["step"] == 30
    # trained on the mixture: both sources fed the run
    assert results["train_metrics"]["tokens_seen/domain"] > 0 and results["train_metrics"]["tokens_seen/general"] > 0
    assert results["after"]["domain"]["loss_nats"] < results["before"]["domain"]["loss_nats"] - 0.1
    saved = json.loads((tmp_path / "out" / "domain_adapt.json").read_text())
    assert saved["after"] == results["after"]
    table = (tmp_path / "out" / "domain_adapt.md").read_text()
    assert "| domain (licenses) |" in table and "| general (stdlib) |" in table
    assert "| domain (licenses) |" in capsys.readouterr().out


@needs_licenses
def test_domain_experiment_continues_a_checkpoint_on_the_mixture(compose, tiny_prepared, tmp_path):
    from framework.run import run

    ckpt, _ = _checkpoint(tmp_path, "tiny", "clm", tiny_prepared.tokenizer(), record_tokenizer=True)
    metrics = run(to_run_config(compose(["experiment=domain_legal", f"init_from={ckpt}",
                                         f"data.tokenizer_path={tiny_prepared.tokenizer_path}", "data.max_documents=60",
                                         "trainer.max_steps=2", "callbacks.throughput=false",
                                         "callbacks.model_card=false"])), tmp_path / "run")
    assert metrics["step"] == 2
    assert metrics["tokens_seen/legal"] + metrics["tokens_seen/general"] == metrics["tokens_seen"]
    assert 0 < metrics["val_loss_nats/legal"] < 10 and 0 < metrics["val_loss_nats/general"] < 10
