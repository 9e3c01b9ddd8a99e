"""Model cards: content from known facts; a tiny run writes one into its directory and into its export, and the
run directory serves fw-generate and fw-eval (lm-evaluation-harness)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from framework.tracking.model_card import ModelCardInfo, render_model_card, write_model_card
from framework.models import ModelConfig


def test_card_states_architecture_data_compute_losses_use_and_limits(tmp_path):
    cfg = ModelConfig.from_name("tiny", vocab_size=512)
    info = ModelCardInfo(
        name="tiny-run", objective="clm", model_config=dataclasses.asdict(cfg), parameters=cfg.num_parameters(),
        data={"source": "stdlib", "description": "the embedded corpus", "seq_len": 64, "tokens_seen": 3072},
        compute={"steps": 6, "devices": 2, "accelerator": "A100", "precision": "bf16-mixed", "flops": 1.728e20},
        results={"train_loss": 3.21, "val_loss_nats": 3.5, "val_ppl": 33.115,
                 "eval": {"docstring_topic": {0: {"acc": 0.5, "acc_stderr": 0.08, "acc_norm": 0.45, "n": 40},
                                              3: {"acc": 0.625, "acc_stderr": 0.078, "n": 40}}}})
    text = render_model_card(info)
    for expected in [
        "# tiny-run", "causal language modelling", "decoder-only transformer", "2 layers, d_model 64, 4 attention heads",
        f"**parameters: {cfg.num_parameters():,}**", "source: the embedded corpus", "**tokens seen: 3,072**",
        "**training compute: 1.728e+20 FLOPs = 2 PF-days**",  # 1.728e20 / 8.64e19
        "hardware: 2 x A100, precision bf16-mixed", "final training loss: 3.2100", "final validation loss: 3.5000",
        "perplexity 33.12", "docstring_topic (lm-evaluation-harness, 40 examples): 0-shot acc 0.500 ± 0.080, "
        "3-shot acc 0.625 ± 0.078", "## Intended use", "## Limitations",
    ]:
        assert expected in text, expected
    readme = write_model_card(tmp_path / "card", info)
    assert readme.read_text() == text
    assert json.loads((tmp_path / "card" / "model_card.json").read_text())["parameters"] == cfg.num_parameters()


def test_card_without_compute_says_not_recorded():
    cfg = ModelConfig.from_name("t5-tiny", vocab_size=512)
    text = render_model_card(ModelCardInfo("t5", "span_corruption", dataclasses.asdict(cfg), cfg.num_parameters()))
    assert "2 encoder + 2 decoder layers" in text and "T5 span corruption" in text
    assert "training compute: not recorded FLOPs" in text and "tokens seen: not recorded" in text


@pytest.mark.slow
def test_run_writes_card_export_copies_it_and_commands_use_the_run_dir(compose, tmp_path, capsys):
    import torch

    from framework.config import to_run_config
    from framework.commands.eval import evaluate as eval_main
    from framework.export import export_checkpoint
    from framework.commands.generate import generate_texts as generate_main
    from framework.scaling.flops import training_flops_per_step
    from framework.run import run

    steps, B, T = 3, 8, 64  # data.micro_batch_size and data.seq_len of the tiny overrides
    cfg = to_run_config(compose([f"trainer.max_steps={steps}", "trainer.val_check_interval=3", "torch_threads=1",
                                 "data.val_windows=4", "callbacks.eval_tasks=[docstring_topic]", "callbacks.eval_limit=4",
                                 "callbacks.eval_shots=[0,1]"]))
    run_dir = tmp_path / "run"
    metrics = run(cfg, run_dir)
    card = json.loads((run_dir / "model_card.json").read_text())
    readme = (run_dir / "README.md").read_text()
    step_flops = training_flops_per_step(ModelConfig(**card["model_config"]), B, T)
    assert card["compute"]["flops"] == metrics["flops"] == steps * step_flops
    assert card["parameters"] == metrics["parameters"]
    assert card["data"]["tokens_seen"] == metrics["tokens_seen"] == steps * B * T
    assert card["results"]["val_loss_nats"] == metrics["val_loss_nats"]
    assert set(metrics["eval"]["docstring_topic"]) == {0, 1} and "docstring_topic" in capsys.readouterr().out
    assert all(r["n"] == 4 and 0 <= r["acc"] <= 1 for r in metrics["eval"]["docstring_topic"].values())
    assert "docstring_topic (lm-evaluation-harness, 4 examples): 0-shot acc" in readme
    assert f"**tokens seen: {steps * B * T:,}**" in readme and f"{steps * step_flops:.4g} FLOPs" in readme

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "export")
    exported = (out / "README.md").read_text()
    assert f"**tokens seen: {steps * B * T:,}**" in exported and f"{steps * step_flops:.4g} FLOPs" in exported
    assert "AutoModelForCausalLM.from_pretrained" in exported
    assert f"final validation loss: {metrics['val_loss_nats']:.4f}" in exported  # same step as the end of training

    torch.set_num_threads(1)
    (text,) = generate_main([str(ckpt), "--prompt", "Return the", "--max-new-tokens", "8", "--greedy"])
    assert text.startswith("Return the") and len(text) > len("Return the")
    results = eval_main([str(ckpt), "--tasks", "docstring_topic", "--shots", "0,1", "--limit", "4", "--device", "cpu"])
    assert results == metrics["eval"]  # the command reproduces the end-of-training evaluation
    written = json.loads((run_dir / "eval" / "last.json").read_text())["results"]["docstring_topic"]
    assert {int(k): v for k, v in written.items()} == metrics["eval"]["docstring_topic"]


def test_each_source_is_described_by_what_it_is():
    from framework.tracking.model_card import describe_data
    from framework.data.config import DataConfig

    assert "standard library" in describe_data(DataConfig(source="stdlib"))["description"]
    assert "licence texts" in describe_data(DataConfig(source="licenses"))["description"]
    assert describe_data(DataConfig(source="files", paths=["a.jsonl"]))["description"] == "local files: a.jsonl"
    hub = describe_data(DataConfig(source="hub", hub_name="wikitext", hub_config="wikitext-103-raw-v1"))
    assert "Hugging Face dataset wikitext (wikitext-103-raw-v1)" in hub["description"]
