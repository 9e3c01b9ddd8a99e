"""Each objective trains its model family on the embedded corpus (validation loss falls), its checkpoint
exports to transformers with equal logits, and objective=<x> picks a model of the right family."""

from __future__ import annotations

import math

import pytest
import torch

from framework.catalogue import FAMILIES, OBJECTIVES
from framework.config import to_run_config
from framework.export import export_checkpoint, load_checkpoint
from framework.models import build_model
from framework.run import build_run

CASES = [
    ("clm", "tiny", []),
    ("mlm", "bert-tiny", ["objective.whole_word_masking=true"]),
    ("span_corruption", "t5-tiny", []),
]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _val_loss(trainer, module, datamodule) -> float:
    return float(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("objective,model,extra", CASES, ids=[c[0] for c in CASES])
def test_objective_trains_and_exports(objective, model, extra, compose, tmp_path, restore_threads):
    overrides = [f"objective={objective}", f"model={model}", "trainer.max_steps=30", "trainer.val_check_interval=30",
                 "optim.lr=3e-3", "logger=csv", "resume=never", "torch_threads=1", *extra]
    cfg = to_run_config(compose(overrides))
    trainer, module, datamodule, prepared = build_run(cfg, tmp_path)
    assert module.model_config.family == OBJECTIVES[objective].family
    before = _val_loss(trainer, module, datamodule)
    trainer.fit(module, datamodule=datamodule)
    after = _val_loss(trainer, module, datamodule)
    assert before > math.log(prepared.vocab_size) - 0.5  # an untrained model is close to uniform
    assert after < before - 0.5, f"{objective}: validation loss {before:.3f} -> {after:.3f}"

    # the trained checkpoint loads in transformers and gives the framework model's logits
    import transformers

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    out = export_checkpoint(checkpoint, tmp_path / "hf", tokenizer_path=prepared.tokenizer_path)  # build_run alone
    # does not copy the tokenizer into the run directory (framework.run's run does)
    config, _, state, _ = load_checkpoint(checkpoint)
    ours = build_model(config).eval()
    ours.load_state_dict(state)
    architecture, auto_class = FAMILIES[config.family].hf_architecture, FAMILIES[config.family].hf_auto_class
    hf = getattr(transformers, auto_class).from_pretrained(out).eval()
    assert type(hf).__name__ == architecture
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]])
    with torch.no_grad():
        if config.family == "encoder_decoder":
            target = torch.tensor([[prepared.special_ids().pad, 5, 300, 301]])
            expected, got = ours(ids, target), hf(input_ids=ids, decoder_input_ids=target).logits
        else:
            expected, got = ours(ids), hf(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_objective_picks_a_model_of_its_family(compose):
    # objective=mlm / span_corruption replace the default (decoder) model unless model= is given
    assert to_run_config(compose(["objective=mlm"], tiny=False)).model.preset == "bert-small-cpu"
    assert to_run_config(compose(["objective=span_corruption"], tiny=False)).model.preset == "t5-small-cpu"
    assert to_run_config(compose(["objective=clm"], tiny=False)).model.preset == "small-cpu"
    assert to_run_config(compose(["objective=mlm", "model=bert-base"], tiny=False)).model.preset == "bert-base"


def test_mismatched_model_is_refused_with_the_fix(compose, tmp_path, restore_threads):
    cfg = to_run_config(compose(["objective=mlm", "model=tiny"]))
    with pytest.raises(ValueError, match="pick a preset of family .encoder."):
        build_run(cfg, tmp_path)
